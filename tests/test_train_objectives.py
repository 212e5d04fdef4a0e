"""The trainer runs the objectives with a temperature (the logit scale then trains): one CPU rank, a few steps of the tiny model on the demo digits, finite
losses and the false-negative share of the loss in the log (the digit class is the label); posterior_infonce on two
gloo ranks over the sharded buffer, as over the replicated one; and the logit scale's
clamp in every copy DeepSpeed keeps (two gloo ranks, ZeRO-1 and ZeRO-3)."""
import math
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, TINY
from fne_dist import metrics_log
from fne_dist.data.digits import build_demo_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("objectives") / "shards"
    manifest = build_demo_shards(out)
    return f"{out}/{manifest['splits']['train']['pattern']}"


@pytest.mark.parametrize("objective", ["clip", "posterior_infonce", "clip_queue", "soft_clip"])
def test_trainer_runs_the_objective(shards, tmp_path, objective):
    overrides = [f"data.train={shards}", "data.val=null", "data.batch_size=16", "fne.queue_size=64",
                 "train.epochs=1", "train.steps_per_epoch=4", "train.log_every=1", f"train.output_dir={tmp_path}",
                 f"fne.objective={objective}", "fne.queue_start_epoch=0", "fne.min_count=5", "fne.prior_fit=true"]
    run = subprocess.run([sys.executable, "-m", "fne_dist.train", "--config", str(ROOT / "configs/demo.yaml"),
                          *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = metrics_log.read(tmp_path / "metrics.jsonl", "train")
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert all(0 <= r["false_negative_loss_share"] <= 1 for r in records)


def test_posterior_infonce_trains_on_two_ranks_over_the_sharded_buffer(shards, tmp_path, port):
    """Two gloo ranks under torchrun, the buffer sharded (the default on several ranks) and replicated: the same
    per-step losses to fp32 rounding (the exchange inside DeepSpeed's backward, through the optimizer steps)."""
    losses = {}
    for layout in ("sharded", "replicated"):
        out = tmp_path / layout
        overrides = [f"data.train={shards}", "data.val=null", "data.batch_size=16", "fne.queue_size=64",
                     "train.epochs=1", "train.steps_per_epoch=4", "train.log_every=1", f"train.output_dir={out}",
                     "fne.objective=posterior_infonce", f"fne.buffer={layout}"]
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(port), "-m", "fne_dist.train", "--config", str(ROOT / "configs/demo.yaml"),
                              *overrides], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        losses[layout] = [r["loss"] for r in metrics_log.read(out / "metrics.jsonl", "train")]
    assert len(losses["sharded"]) == 4 and all(math.isfinite(x) for x in losses["sharded"])
    assert losses["sharded"] == pytest.approx(losses["replicated"], rel=1e-5)


CLAMP_CONFIG = """
model: {{name: {tiny}}}
data: {{train: unused, batch_size: 4}}   # the script brings its batches
fne: {{objective: clip, queue_size: 64}}
train: {{epochs: 1, output_dir: {out}}}
deepspeed:
  zero_optimization: {{stage: {stage}}}
  # beta1 0: each step follows its own gradient, so one step that pushes the scale down moves it down at once
  optimizer: {{type: AdamW, params: {{lr: 0.5, betas: [0.0, 0.999], torch_adam: true}}}}
"""

CLAMP = textwrap.dedent('''
    import dataclasses, sys, torch, deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    import fne_dist.train as T
    from fne_dist.checkpoint import Progress
    from fne_dist.config import load_config
    from fne_dist.data.loader import Batch
    from fne_dist.export import exported_state_dict
    from fne_dist.model import MAX_LOGIT_SCALE

    trainer = T.Trainer(load_config(sys.argv[1]), T.init_distributed(), batches_per_epoch=100)
    rank, param = trainer.rt.rank, trainer.engine.module.logit_scale
    top = torch.tensor(MAX_LOGIT_SCALE)  # the bound in fp32, and the scale it gives
    bound = top.exp().item()
    used, push = [], [4.0]  # the effective scales the loss got; the push on the scale (+ up, - down)
    loss = trainer.objective.loss

    def pushed(*args, logit_scale, **kwargs):
        used.append(float(logit_scale))
        out = loss(*args, logit_scale=logit_scale, **kwargs)
        return dataclasses.replace(out, loss=out.loss - push[0] * logit_scale.sum())

    trainer.objective.loss = pushed
    torch.manual_seed(rank)
    for step in range(10):
        if step == 8:
            push[0] = -4.0  # from here the scale should come down at once
        ids = torch.arange(4) + 4 * (2 * step + rank)
        batch = Batch(torch.randn(4, 3, 32, 32), trainer.towers.tokenizer([f"digit {i}" for i in ids.tolist()]),
                      ids, torch.full((4,), -1))
        assert trainer.train_step(batch, step, warmup=False), f"step {step} was skipped"
        with deepspeed.zero.GatheredParameters([param]):
            weight = param.detach().clone()
        master = safe_get_full_fp32_param(param)  # DeepSpeed's fp32 copy, which the optimizer steps
        assert weight.item() <= top.item() and torch.equal(master, weight), (step, master, weight)
    assert max(used) == used[8] == bound, used  # pushed up to the bound, never past it
    assert used[9] < 0.9 * bound, used  # one step down leaves the bound (not a master far above it)
    tag_dir = trainer._save(Progress(step=10))
    if rank == 0:
        exported = exported_state_dict(tag_dir)[0]["logit_scale"]
        assert exported.shape == () and exported.item() == weight.item(), (exported, weight)
    dist.barrier()
    print("CLAMP-OK", rank, flush=True)
''')


@pytest.mark.parametrize("stage", [1, 3])
def test_logit_scale_clamp_holds_in_deepspeeds_fp32_master_copy(tmp_path, port, stage):
    """Two gloo ranks, objective clip, a loss term that pushes the logit scale up for 8 steps (AdamW, lr 0.5) and
    then down: the scale the loss gets stays <= 100 and reaches it; after every step DeepSpeed's fp32 master copy
    (ZeRO-1: a fragment on one rank; ZeRO-3: a partition, the other rank's being padding) equals the clamped weight,
    so the first step down leaves the bound (at once, with beta1 0), and the export of the checkpoint (ZeRO-3: from
    the fp32 partitions) holds the weight the loss used."""
    (tmp_path / "config.yaml").write_text(CLAMP_CONFIG.format(tiny=TINY, out=tmp_path / "run", stage=stage))
    (tmp_path / "clamp.py").write_text(CLAMP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(tmp_path / "clamp.py"), str(tmp_path / "config.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.count("CLAMP-OK") == 2, done.stdout[-3000:] + done.stderr[-3000:]
