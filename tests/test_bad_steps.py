"""Non-finite steps: skipped on every rank and counted, and after `train.max_bad_steps` in a row the run stops
with a message that says what to do.  A one-rank run whose online image features turn NaN (patched in a
subprocess, so that nothing leaks into the test process)."""
import subprocess
import sys

from conftest import ROOT
from fne_dist.data.digits import build_demo_shards

SCRIPT = """
import sys
import fne_dist.train as T
from fne_dist.config import load_config

real_encode = T.encode
T.encode = lambda model, images, tokens: tuple(x * float("nan") for x in real_encode(model, images, tokens))
try:
    T.train(load_config(sys.argv[1], sys.argv[2:]))
except T.BadStepsError as err:
    print("STOPPED:", err)
"""


def test_nan_steps_are_skipped_counted_then_stop_the_run(tmp_path):
    manifest = build_demo_shards(tmp_path / "shards")
    train = f"{tmp_path}/shards/{manifest['splits']['train']['pattern']}"
    overrides = [f"data.train={train}", "data.val=null", "data.batch_size=8", "fne.queue_size=64",
                 "train.epochs=1", "train.steps_per_epoch=6", "train.max_bad_steps=3",
                 f"train.output_dir={tmp_path}/run"]
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "configs/demo.yaml"), *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for n in (1, 2, 3):
        assert f"step skipped ({n} in a row)" in run.stderr
    assert "STOPPED: 3 consecutive steps" in run.stdout and "train.max_bad_steps=3" in run.stdout
    assert "Lower the learning rate" in run.stdout
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


NAN_LOSS = """
import sys
import torch
import fne_dist.train as T
from fne_dist.config import load_config
from fne_dist.objective import Objective

real_loss = Objective.loss
def nan_loss(self, *args, **kwargs):
    out = real_loss(self, *args, **kwargs)
    out.loss = out.loss * float("nan")
    return out
Objective.loss = nan_loss
trainer = T.Trainer(load_config(sys.argv[1], sys.argv[2:]), T.init_distributed())
online = [p.detach().clone() for p in trainer.engine.module.parameters()]
momentum = [p.detach().clone() for p in trainer.momentum.parameters()]
try:
    trainer.run()
except T.BadStepsError:
    pass
after = trainer.engine.module.parameters()
print("queued", int(trainer.objective.buffer.queue.valid.sum()), "positives", float(trainer.objective.stats.count_pos),
      "online_kept", all(torch.equal(a, b) for a, b in zip(online, after)),
      "momentum_kept", all(torch.equal(a, b) for a, b in zip(momentum, trainer.momentum.parameters())))
"""


def test_a_non_finite_loss_touches_nothing(tmp_path):
    """The features are finite, the loss is not: no backward, no optimizer step, no EMA, no statistics, no enqueue."""
    manifest = build_demo_shards(tmp_path / "shards")
    train = f"{tmp_path}/shards/{manifest['splits']['train']['pattern']}"
    overrides = [f"data.train={train}", "data.val=null", "data.batch_size=8", "fne.queue_size=64",
                 "fne.warmup_epochs=0", "train.epochs=1", "train.steps_per_epoch=6", "train.max_bad_steps=2",
                 f"train.output_dir={tmp_path}/run"]
    run = subprocess.run([sys.executable, "-c", NAN_LOSS, str(ROOT / "configs/demo.yaml"), *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step skipped (2 in a row)" in run.stderr
    assert "queued 0 positives 0.0 online_kept True momentum_kept True" in run.stdout
