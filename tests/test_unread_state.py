"""What an objective does not read, the trainer does not build: clip (in-batch, ids only) runs no momentum towers
under the default fne.keys=momentum and holds no negative buffer; soft_clip reads the momentum keys of the batch but
no buffer.  Their checkpoints hold neither, and a resume continues bitwise.  One gloo rank, ZeRO-1."""
import os
import subprocess
import sys
import textwrap

from conftest import ROOT, TINY

CONFIG = """
model: {{name: {tiny}}}
data: {{train: unused, batch_size: 4}}   # the script brings its batches
fne: {{mode: bayes, min_count: 4, queue_size: 64, warmup_epochs: 0}}
train: {{epochs: 1, seed: 3}}
deepspeed:
  optimizer: {{type: AdamW, params: {{lr: 0.01, torch_adam: true}}}}
"""

SCRIPT = textwrap.dedent('''
    import logging, sys, torch
    import fne_dist.train as T
    from fne_dist import checkpoint
    from fne_dist.checkpoint import Progress
    from fne_dist.config import load_config
    from fne_dist.data.loader import Batch

    config, out = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO)  # the trainer's lines about unused settings

    def trainer(name, *overrides):
        cfg = load_config(config, [f"train.output_dir={out}/{name}", *overrides])
        return T.Trainer(cfg, T.init_distributed(), batches_per_epoch=100)

    def losses(run, first, last):
        done = []
        commit = run.objective.commit
        run.objective.commit = lambda out: (done.append(out.loss.item()), commit(out))
        for step in range(first, last):
            g = torch.Generator().manual_seed(step)
            ids = torch.arange(4) + 4 * step
            b = Batch(torch.randn(4, 3, 32, 32, generator=g),
                      run.towers.tokenizer([f"digit {i}" for i in ids.tolist()]), ids, ids % 3)
            assert run.train_step(b, step, warmup=False, epoch=0), f"step {step} was skipped"
        return done

    for name, momentum in (("clip", False), ("soft_clip", True)):
        first = trainer(name, f"fne.objective={name}")
        assert (first.momentum is not None) == momentum and first.objective.buffer is None, name
        losses(first, 0, 2)
        tag = first._save(Progress(step=2, batch=2))
        files = sorted(p.name for p in tag.iterdir())
        assert not [f for f in files if f.startswith(("buffer_rank", "momentum_rank"))], files
        assert (checkpoint.read_state(tag)["momentum"] is not None) == momentum
        after = losses(first, 2, 4)
        resumed = trainer(name + "-resumed", f"fne.objective={name}", f"train.resume={tag}")
        assert resumed._resume().step == 2
        again = losses(resumed, 2, 4)
        assert again == after, (name, again, after)
        print("UNREAD-OK", name, flush=True)
''')


def test_what_an_objective_does_not_read_is_not_built(tmp_path, port):
    """clip: no momentum tower and no buffer although fne.keys=momentum and fne.queue_size=64 (so no EMA, no
    momentum forward, nothing enqueued); soft_clip: momentum towers, no buffer; neither checkpoint has buffer or
    momentum-partition files (soft_clip's momentum towers are in fne_state.pt under ZeRO-1); a resume from each
    continues with bitwise the same losses."""
    (tmp_path / "config.yaml").write_text(CONFIG.format(tiny=TINY))
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "--master_port", str(port), str(tmp_path / "script.py"), str(tmp_path / "config.yaml"),
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.stdout.count("UNREAD-OK") == 2, done.stdout[-3000:] + done.stderr[-5000:]
    assert "fne.objective=clip reads no keys: no momentum towers are built or run" in done.stderr
    assert "fne.objective=soft_clip reads no negative buffer" in done.stderr
