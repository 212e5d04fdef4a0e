"""fne.keys=online in the trainer: no momentum towers are built, updated, checkpointed or gathered; the keys that
enter the buffer are the online features of the step; a checkpoint holds no momentum state, exports, resumes
exactly, and refuses to resume with momentum keys.  One gloo rank under ZeRO-1 and two under ZeRO-3 (the 2-rank
buffer sharded).  What each objective computes from online keys is tests/test_objectives.py's."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, TINY

CONFIG = """
model: {{name: {tiny}}}
data: {{train: unused, batch_size: 4}}   # the script brings its batches
fne: {{keys: online, mode: bayes, min_count: 4, queue_size: 64, warmup_epochs: 0}}
train: {{epochs: 1, seed: 3}}
deepspeed:
  zero_optimization: {{stage: {stage}}}
  optimizer: {{type: AdamW, params: {{lr: 0.01, torch_adam: true}}}}
"""

SCRIPT = textwrap.dedent('''
    import sys, torch
    import torch.distributed as dist
    import fne_dist.train as T
    from fne_dist import checkpoint
    from fne_dist.checkpoint import Progress
    from fne_dist.config import load_config
    from fne_dist.data.loader import Batch
    from fne_dist.export import exported_state_dict
    from fne_dist.model import encode

    config, out = sys.argv[1], sys.argv[2]
    MOMENTUM = ("momentum_copy", "shard_momentum", "momentum_update")
    real = {name: getattr(T, name) for name in MOMENTUM}

    def forbidden(*args, **kwargs):
        raise AssertionError("a momentum tower was built, sharded or updated")

    for name in MOMENTUM:
        setattr(T, name, forbidden)

    def trainer(name, *overrides):
        cfg = load_config(config, [f"train.output_dir={out}/{name}", *overrides])
        return T.Trainer(cfg, T.init_distributed(), batches_per_epoch=100)

    def batch(step, rank, tokenizer):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.arange(4) + 4 * (2 * step + rank)
        return Batch(torch.randn(4, 3, 32, 32, generator=g), tokenizer([f"digit {i}" for i in ids.tolist()]), ids,
                     ids % 3)

    def steps(run, first, last, check_keys=False):
        """Train steps first..last-1; returns this rank's losses.  check_keys: the enqueued keys of this rank's rows
        are its online features of the step (computed before it, same weights)."""
        committed, losses = [], []
        commit = run.objective.commit
        run.objective.commit = lambda out: (committed.append(out), commit(out))
        rank = run.rt.rank
        for step in range(first, last):
            b = batch(step, rank, run.towers.tokenizer)
            if check_keys:
                with torch.no_grad():
                    ia, ta, _ = encode(run.engine, b.images, b.tokens)
            assert run.train_step(b, step, warmup=False), f"step {step} was skipped"
            keys = committed[-1].keys
            if check_keys:
                rows = slice(4 * rank, 4 * rank + 4)
                torch.testing.assert_close(keys.image[rows], ia, rtol=0, atol=1e-6)
                torch.testing.assert_close(keys.text[rows], ta, rtol=0, atol=1e-6)
                assert not keys.image.requires_grad and len(keys.ids) == 4 * run.rt.world_size
            losses.append(committed[-1].loss.item())
        return losses

    first = trainer("A")
    rank, world = first.rt.rank, first.rt.world_size
    assert first.momentum is None and first.trunk_tap is None
    assert first.objective.buffer.sharded == (world > 1)
    steps(first, 0, 2, check_keys=True)
    tag = first._save(Progress(step=2, batch=2))
    assert not list(tag.glob("momentum_rank*")), sorted(p.name for p in tag.iterdir())
    state = checkpoint.read_state(tag)
    assert state["momentum"] is None and state["config"]["fne"]["keys"] == "online"
    if rank == 0:
        exported = exported_state_dict(tag)[0]
        assert set(exported) == set(first.engine.module.state_dict()), sorted(exported)
    losses = steps(first, 2, 4)

    resumed = trainer("B", f"train.resume={tag}")
    assert resumed.momentum is None and resumed._resume().step == 2
    again = steps(resumed, 2, 4)
    assert again == losses, (again, losses)  # bitwise: the same floats

    for name in MOMENTUM:
        setattr(T, name, real[name])
    other = trainer("C", f"train.resume={tag}", "fne.keys=momentum")
    try:
        other._resume()
        raise RuntimeError("a resume with momentum keys from an online-keys checkpoint was accepted")
    except checkpoint.CheckpointMismatch as err:
        assert "fne.keys: 'online' -> 'momentum'" in str(err) and "Resume with the checkpoint's settings" in str(err)
        if rank == 0:
            print("REFUSED:", err, flush=True)
    dist.barrier()
    print("ONLINE-KEYS-OK", rank, flush=True)
''')


@pytest.mark.parametrize("world,stage", [(1, 1), (2, 3)])
def test_trainer_with_online_keys(tmp_path, port, world, stage):
    """Four steps of the tiny model (objective fne, Bayes rule, min_count 4): no momentum tower is built,
    sharded or updated (those functions raise); the keys each rank enqueues equal its online features of
    the step (atol 1e-6: the same forward); the checkpoint holds no momentum state and exports; a resume from it
    continues with bitwise the same losses; a resume with fne.keys=momentum is refused, naming the key."""
    (tmp_path / "config.yaml").write_text(CONFIG.format(tiny=TINY, stage=stage))
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--master_port", str(port), str(tmp_path / "script.py"), str(tmp_path / "config.yaml"),
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.stdout.count("ONLINE-KEYS-OK") == world, done.stdout[-3000:] + done.stderr[-5000:]
    assert "this run differs in fne.keys: 'online' -> 'momentum'" in done.stdout
