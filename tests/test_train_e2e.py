"""Two CPU ranks end to end: train, get preempted, checkpoint, resume, and continue exactly as a run that was
never interrupted; a corrupt shard member is skipped and counted; an incompatible resume is refused;
fne-eval reads the checkpoint.

Three launches of a tiny model (a few seconds of training each):
  P  two ranks started by hand; SIGTERM to rank 1 only once training runs -> every rank saves at the same step k
     and exits with EXIT_PREEMPTED;
  A  torchrun, from scratch, for k + 2 steps without interruption;
  C  torchrun, resumed from P's checkpoint, for k + 2 steps.
A's losses equal P's up to step k and C's after it, bitwise (the same floats in the JSON log).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fne_dist import checkpoint, metrics_log
from fne_dist.config import load_config, to_dict
from fne_dist.demo_data import build_demo_shards, render
from fne_dist.evaluate import main as fne_eval
from fne_dist.shards import ShardSample, write_shard
from fne_dist.train import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT = 240

CONFIG = """
model:
  name: {root}/configs/models/tiny-vit.json
data:
  train: {shards}/train-000000.tar::{shards}/bad-000000.tar
  val: {shards}/test-000000.tar
  batch_size: 8
  workers: 0
  shuffle_buffer: 1          # read in order: the corrupt member comes first in its shard
fne:
  mode: bayes
  queue_size: 64             # >= the global batch of 16; wraps every 4 steps
  min_count: 4               # the Bayes rule switches on within a few steps
  warmup_epochs: 1
train:
  epochs: 100
  steps_per_epoch: 3
  seed: 3
  log_every: 1
  eval_every: 2
  checkpoint_every: 0
deepspeed:
  zero_optimization: {{stage: 3}}   # partitioned weights: the EMA gathers them, fne-eval reassembles them
  gradient_clipping: 1.0
  optimizer: {{type: AdamW, params: {{lr: 1.0e-3, weight_decay: 0.1, torch_adam: true}}}}
  scheduler: {{type: WarmupLR, params: {{warmup_num_steps: 5, warmup_type: linear}}}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "-m", "fne_dist.train", "--config", str(config), *args]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_log.read(run_dir / "metrics.jsonl", "train")}


def write_bad_shard(path: Path) -> None:
    """A shard whose first sample's image is not a PNG at all, then 20 good digits."""
    import numpy as np

    digits = np.random.default_rng(0).integers(0, 17, size=(20, 8, 8)).astype(float)
    good = [ShardSample(f"bad{i:03d}", render(d, 32), "png", [f"the digit {i % 10}", f"a scanned {i % 10}"],
                        image_id=10_000 + i, label=i % 10) for i, d in enumerate(digits)]
    corrupt = ShardSample("bad999", b"this is not an image", "png", ["the digit one"], image_id=19_999, label=1)
    write_shard(path, [corrupt, *good])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    shards = base / "shards"
    build_demo_shards(shards, shard_size=600, n_test=200)
    write_bad_shard(shards / "bad-000000.tar")
    config = base / "tiny.yaml"
    config.write_text(CONFIG.format(root=ROOT, shards=shards))

    # P: preempted by a signal to one rank
    port = free_port()
    cmd = [sys.executable, "-m", "fne_dist.train", "--config", str(config), f"train.output_dir={base / 'P'}"]
    procs = [subprocess.Popen(cmd, env={**env(), "RANK": str(r), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(r),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    log = base / "P" / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while not (log.exists() and len(metrics_log.read(log, "train")) >= 5):  # past the warm-up epoch
        assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].communicate()[0][-5000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * WORLD, outputs[0][-3000:] + outputs[1][-3000:]
    preempted = json.loads((base / "P" / "summary.json").read_text())
    k = preempted["step"]

    torchrun(config, f"train.output_dir={base / 'A'}", f"train.steps={k + 2}")
    torchrun(config, f"train.output_dir={base / 'C'}", f"train.steps={k + 2}", "--resume", str(base / "P"))
    return {"base": base, "k": k, "preempted": preempted, "outputs": outputs, "config": config}


def test_stop_request_on_one_rank_saves_on_all_ranks(runs):
    base, k = runs["base"], runs["k"]
    assert runs["preempted"]["preempted"] is True and k >= 5
    tag = base / "P" / "checkpoints" / checkpoint.tag_name(k)
    assert (base / "P" / "checkpoints" / "latest").read_text() == tag.name
    assert sorted(p.name for p in tag.glob("rng_rank*.pt")) == ["rng_rank00000.pt", "rng_rank00001.pt"]
    assert "stop requested (SIGTERM)" in runs["outputs"][0] + runs["outputs"][1]


def test_resumed_run_continues_exactly(runs):
    base, k = runs["base"], runs["k"]
    uninterrupted, preempted, resumed = losses(base / "A"), losses(base / "P"), losses(base / "C")
    assert sorted(uninterrupted) == list(range(1, k + 3))
    assert {s: uninterrupted[s] for s in preempted} == preempted  # same trajectory up to the preemption
    assert sorted(resumed) == [k + 1, k + 2]
    assert {s: uninterrupted[s] for s in resumed} == resumed  # bitwise: the same floats
    fne_steps = [r for r in metrics_log.read(base / "C" / "metrics.jsonl", "train") if not r["warmup"]]
    assert fne_steps and all("mean_survivors" in r for r in fne_steps)


def test_corrupt_member_is_skipped_and_counted(runs):
    records = metrics_log.read(runs["base"] / "A" / "metrics.jsonl", "train")
    assert records[-1]["data_skipped"] >= 1
    assert "bad999" in "".join(runs["outputs"])  # the log names the member it skipped


def test_evaluation_runs_on_both_ranks_and_fne_eval_reads_the_checkpoint(runs, tmp_path):
    evals = metrics_log.read(runs["base"] / "A" / "metrics.jsonl", "eval")
    assert evals and all(0 <= e["i2t_R@1"] <= 100 for e in evals)
    out = tmp_path / "eval.json"
    assert fne_eval(["--checkpoint", str(runs["base"] / "A"), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == 200 and metrics["texts"] == 600 and 0 <= metrics["rsum"] <= 600


def test_incompatible_resume_is_refused(runs):
    tag = checkpoint.locate(runs["base"] / "A")
    state = checkpoint.read_state(tag)
    other = to_dict(load_config(runs["config"], ["fne.queue_size=128", "fne.mode=official"]))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"fne\.mode: 'bayes' -> 'official'.*"
                                                            r"fne\.queue_size: 64 -> 128"):
        checkpoint.check_compatible(state, config=other, architecture=state["architecture"], tag_dir=tag)
    wider = {**state["architecture"], "embed_dim": 32}
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"model architecture embed_dim: 64 -> 32"):
        checkpoint.check_compatible(state, config=state["config"], architecture=wider, tag_dir=tag)
    assert torch.equal(torch.load(tag / "buffer_rank00000.pt")["valid"], torch.ones(64, dtype=torch.bool))


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one file into the tag, then optionally dies (a crash mid-save)."""

    def __init__(self, crash: bool):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is ours to move, after every file is written
        (Path(save_dir) / tag / checkpoint.DS_MODEL_STATES).write_bytes(b"engine state")
        if self.crash:
            raise OSError("No space left on device")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_latest(tmp_path):
    from fne_dist.config import FNESection
    from fne_dist.objective import Objective

    objective = Objective(FNESection(queue_size=8), dim=4, device=torch.device("cpu"), seed=0)
    kwargs = dict(config={}, architecture={}, momentum=torch.nn.Linear(4, 4), objective=objective)
    first = checkpoint.save(FakeEngine(crash=False), tmp_path, progress=checkpoint.Progress(step=10), **kwargs)
    with pytest.raises(OSError):
        checkpoint.save(FakeEngine(crash=True), tmp_path, progress=checkpoint.Progress(step=20), **kwargs)
    assert (tmp_path / checkpoint.tag_name(20) / checkpoint.STATE).is_file()  # a partial tag exists ...
    assert checkpoint.find("latest", tmp_path) == first  # ... but latest still names the complete one
    assert checkpoint.read_state(first)["progress"] == {"step": 10, "epoch": 0, "batch": 0}
