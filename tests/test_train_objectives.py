"""The trainer runs the objectives with a temperature (the logit scale then trains): one CPU rank, a few steps of the tiny model on the demo digits, finite
losses and the false-negative share of the loss in the log (the digit class is the label)."""
import math
import subprocess
import sys

import pytest

from conftest import ROOT
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
