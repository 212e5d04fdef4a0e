"""Two CPU ranks end to end: train, get preempted, checkpoint, resume, and continue exactly as a run that was
never interrupted; a corrupt shard member is skipped and counted; an incompatible resume is refused;
fne-eval reads the checkpoint.

Three launches of a tiny model (a few seconds of training each):
  P  torchrun; SIGTERM to rank 1 only once training runs -> every rank saves at the same step k and exits with
     EXIT_PREEMPTED, which torchrun's report shows for every rank;
  A  torchrun, from scratch, for k + 2 steps without interruption;
  C  torchrun, `--resume latest` in P's folder for k + 2 steps, after records of steps past k were appended to P's
     metrics.jsonl (what a crash after step k leaves).
A's losses equal P's up to step k and C's after it, bitwise (the same floats in the JSON log), and the log holds
each step once.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fne_dist import checkpoint, metrics_log
from fne_dist.config import load_config, to_dict
from fne_dist.data.digits import build_demo_shards, render
from fne_dist.distributed import free_port
from fne_dist.evaluate import main as fne_eval
from fne_dist.data.shards import ShardSample, write_shard
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
  zero_optimization: {{stage: 3}}   # online and momentum towers partitioned; fne-eval reassembles the online
  gradient_clipping: 1.0
  optimizer: {{type: AdamW, params: {{lr: 1.0e-3, weight_decay: 0.1, torch_adam: true}}}}
  scheduler: {{type: WarmupLR, params: {{warmup_num_steps: 5, warmup_type: linear}}}}
"""


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
            str(free_port()), "-m", "fne_dist.train", "--config", str(config), *args]


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun_cmd(config, *args), env=env(), capture_output=True, text=True, timeout=TIMEOUT)
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
    launcher = subprocess.Popen(torchrun_cmd(config, f"train.output_dir={base / 'P'}"), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = base / "P" / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while not (log.exists() and len(metrics_log.read(log, "train")) >= 5):  # past the warm-up epoch
        assert time.time() < deadline and launcher.poll() is None, launcher.communicate()[0][-5000:]
        time.sleep(0.2)
    [rank1] = [p for p in psutil.Process(launcher.pid).children() if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=TIMEOUT)[0]
    preempted = json.loads((base / "P" / "summary.json").read_text())
    k = preempted["step"]
    tag = base / "P" / "checkpoints" / checkpoint.tag_name(k)
    facts = {"returncode": launcher.returncode, "output": output, "latest": checkpoint.find("latest", tag.parent),
             "rng": [torch.load(tag / f"rng_rank{r:05d}.pt", weights_only=False)["torch"] for r in range(WORLD)]}

    torchrun(config, f"train.output_dir={base / 'A'}", f"train.steps={k + 2}")
    with log.open("a") as crashed:  # records a run wrote after its last checkpoint, before it died
        crashed.writelines(json.dumps({"kind": "train", "step": s, "loss": -1.0}) + "\n" for s in range(k + 1, k + 4))
    resumed = torchrun(config, f"train.output_dir={base / 'P'}", f"train.steps={k + 2}", "--resume", "latest")
    return {"base": base, "k": k, "preempted": preempted, "P": facts, "config": config,
            "outputs": [output, resumed.stdout + resumed.stderr]}


def test_stop_request_on_one_rank_saves_on_all_ranks_and_every_rank_exits_75(runs):
    k, P = runs["k"], runs["P"]
    assert runs["preempted"]["preempted"] is True and k >= 5
    assert P["latest"].name == checkpoint.tag_name(k)
    assert sorted(p.name for p in P["latest"].glob("rng_rank*.pt")) == ["rng_rank00000.pt", "rng_rank00001.pt"]
    partitions = [torch.load(P["latest"] / f"momentum_rank{r:05d}.pt")["partitions"] for r in range(WORLD)]
    assert [t.shape for t in partitions[0]] == [t.shape for t in partitions[1]]  # ZeRO-3: each rank its half
    assert checkpoint.read_state(P["latest"])["momentum"] is None
    assert "stop requested (SIGTERM)" in P["output"]
    # torchrun turns any non-zero worker status into its own 1; its report names each rank's: 75, none killed
    exits = P["output"].count(f"exitcode  : {EXIT_PREEMPTED} (pid")
    assert P["returncode"] == 1 and exits == WORLD, P["output"][-3000:]


def test_ranks_draw_different_random_numbers(runs):
    assert not torch.equal(*runs["P"]["rng"])  # seeded with seed + rank once the towers are built


def test_resumed_run_continues_exactly_and_logs_each_step_once(runs):
    base, k = runs["base"], runs["k"]
    uninterrupted = losses(base / "A")
    records = metrics_log.read(base / "P" / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == list(range(1, k + 3))  # the crashed run's extra records are gone
    assert sorted(uninterrupted) == list(range(1, k + 3))
    assert {r["step"]: r["loss"] for r in records} == uninterrupted  # bitwise: the same floats, before and after k
    assert [r for r in records if not r["warmup"] and r["step"] > k and "mean_survivors" in r]


def test_corrupt_member_is_skipped_and_counted_across_a_resume(runs):
    uninterrupted = metrics_log.read(runs["base"] / "A" / "metrics.jsonl", "train")
    resumed = metrics_log.read(runs["base"] / "P" / "metrics.jsonl", "train")
    assert uninterrupted[-1]["data_skipped"] >= 1
    assert resumed[-1]["data_skipped"] == uninterrupted[-1]["data_skipped"]  # kept in the checkpoint
    assert "bad999" in "".join(runs["outputs"])  # the log names the member it skipped


def test_evaluation_runs_on_both_ranks_and_fne_eval_reads_the_checkpoint(runs, tmp_path):
    evals = metrics_log.read(runs["base"] / "A" / "metrics.jsonl", "eval")
    assert evals and all(0 <= e["i2t_R@1"] <= 100 for e in evals)
    assert all(e["rsum"] <= e["group_rsum"] <= 600 for e in evals)  # labelled digits: the group-aware recall too
    out = tmp_path / "eval.json"
    assert fne_eval(["--checkpoint", str(runs["base"] / "A"), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == 200 and metrics["texts"] == 600 and 0 <= metrics["rsum"] <= 600
    assert metrics["rsum"] <= metrics["group_rsum"] <= 600


def test_incompatible_resume_is_refused(runs):
    tag = checkpoint.locate(runs["base"] / "A")
    state = checkpoint.read_state(tag)
    other = to_dict(load_config(runs["config"], ["fne.queue_size=128", "fne.mode=official"]))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"fne\.mode: 'bayes' -> 'official'.*"
                                                            r"fne\.queue_size: 64 -> 128"):
        checkpoint.check_compatible(state, config=other, architecture=state["architecture"], tag_dir=tag,
                                    resolved=state["resolved"])
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"world size: 2 -> 1"):  # this test runs as one rank
        checkpoint.check_compatible(state, config=state["config"], architecture=state["architecture"], tag_dir=tag,
                                    resolved=state["resolved"])
    wider = {**state["architecture"], "embed_dim": 32}
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"model architecture embed_dim: 64 -> 32"):
        checkpoint.check_compatible(state, config=state["config"], architecture=wider, tag_dir=tag,
                                    resolved=state["resolved"])
    assert torch.equal(torch.load(tag / "buffer_rank00000.pt")["valid"], torch.ones(64, dtype=torch.bool))
