"""Shared pieces of the launch and SLURM tests: the cluster probe, the demo's shards and overrides, a stand-in
trainer, and one rank of the stop-agreement test.

`toy_train` behaves like `fne_dist.train.train` where the launch machinery can tell (process group from the
environment, a StopRequest checked every step, a checkpoint on every rank at a stop, metrics JSONL, resume, a summary
with "preempted"), at no cost, so the preemption tests can check that machinery exactly and in seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from filelock import FileLock

from fne_dist.data.digits import build_demo_shards
from fne_dist.preemption import StopRequest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """The demo's shards, built once into the project's cache (the build is idempotent; the lock keeps two test
    workers from writing the same shards at once)."""
    out = ROOT / ".cache" / "demo_shards"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / "demo_shards.lock"):
        build_demo_shards(out)
    return out


def demo_overrides(shards: Path, output_dir: Path, steps: int) -> list[str]:
    """configs/demo.yaml cut down to a few small steps with a log line per step and no evaluation."""
    return [f"model.name={ROOT / 'configs' / 'models' / 'tiny-vit.json'}",
            f"data.train={shards}/train-{{000000..000007}}.tar", f"data.val={shards}/test-000001.tar",
            f"train.output_dir={output_dir}", f"train.steps={steps}", "train.eval_every=0", "train.log_every=1",
            "data.batch_size=8", "fne.queue_size=64"]


def slurm_answers() -> bool:
    """True when `sinfo` reaches a controller with a node that takes jobs."""
    if not shutil.which("sinfo"):
        return False
    try:  # a controller that is down takes sinfo ~10 s of retries to report
        run = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=3)
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0 and any(s in ("idle", "mixed", "allocated", "completing") for s in run.stdout.split())


needs_slurm = [pytest.mark.slurm,
               pytest.mark.skipif(not slurm_answers(), reason="no SLURM cluster answers `sinfo`: start the one-node "
                                                             "test cluster with `sudo slurm/local_cluster.sh up`")]


def read_metrics(output_dir: Path) -> list[dict]:
    """The training records of metrics.jsonl (the trainer's and the stand-in's)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind", "train") == "train"]


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def toy_loss(step: int) -> float:
    return 1.0 / step


def toy_train(cfg) -> dict:
    """A stand-in for fne_dist.train.train: `step_s` seconds per step (env FNE_TOY_STEP_S), no model.

    Checkpoints are `ckpt/step_<n>/rank<r>.json`, written by every rank, plus `ckpt/latest` (rank 0, after a barrier).
    data.train == "fail" raises on every rank, like a shard pattern that matches nothing.  With FNE_TOY_NOTICE_AT=k,
    rank 0 alone gets SIGUSR2 (submitit's preemption notice) at step k of a run that did not resume.
    """
    t = cfg.train
    if cfg.data.train == "fail":
        raise FileNotFoundError("toy failure: no shard matches data.train='fail'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(t.output_dir)
    ckpt = out / "ckpt"
    stop = StopRequest()
    stop.install()

    def save(step: int) -> None:
        where = ckpt / f"step_{step}"
        where.mkdir(parents=True, exist_ok=True)
        (where / f"rank{rank}.json").write_text(json.dumps({"step": step}))
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            (ckpt / "latest").write_text(where.name)

    start = 0
    if t.resume in ("latest", "auto") and (ckpt / "latest").exists():
        start = json.loads((ckpt / (ckpt / "latest").read_text() / f"rank{rank}.json").read_text())["step"]
    elif t.resume == "latest":
        raise FileNotFoundError(f"train.resume=latest but {ckpt} holds no checkpoint")
    step_s = float(os.environ.get("FNE_TOY_STEP_S", "0.05"))
    notice_at = int(os.environ.get("FNE_TOY_NOTICE_AT", "0")) if start == 0 and rank == 0 else 0
    summary = {"preempted": False, "start_step": start, "world_size": world}
    step = start
    while step < t.steps:
        step += 1
        time.sleep(step_s)
        if step == notice_at:
            os.kill(os.getpid(), signal.SIGUSR2)
        value = torch.tensor([toy_loss(step)])
        if dist.is_initialized():
            dist.all_reduce(value)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": value.item() / world}) + "\n")
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            save(step)
        if stop.agree(torch.tensor(False))[1]:  # as the trainer: with the step's non-finite check
            save(step)
            summary["preempted"] = True
            break
    else:
        save(step)
    summary["step"] = step
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def agree_on_stop(rank: int, world: int, port: int, out_dir: str, signal_rank: int, signal_step: int) -> None:
    """One of `world` gloo ranks: `signal_rank` alone gets SIGTERM at `signal_step`; records where it stopped."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    stop = StopRequest()
    stop.install()
    stopped_at = None
    for step in range(1, 50):
        if rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if stop.agree(torch.tensor(False))[1]:
            stopped_at = step
            break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"step": stopped_at, "signals": stop.signals}))
    dist.destroy_process_group()
