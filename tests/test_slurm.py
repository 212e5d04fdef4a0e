"""fne-launch against a real SLURM (the one-node cluster of slurm/local_cluster.sh): a 2-task CPU training job,
`scontrol requeue` in the middle of it, a job that fails, and resources the cluster can never give."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fne_dist import launch
from slurm_fixtures import (DEMO, ROOT, TESTS, demo_overrides, demo_shards, needs_slurm, read_metrics,  # noqa: F401
                            toy_train, wait_until)

pytestmark = needs_slurm
STEPS = 30


def squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def release_when_requeued(job_id: str) -> None:
    """SLURM holds a requeued job for ~2 minutes before it is eligible again; a test need not wait.

    It must wait, though, until the node has cleaned up the job's first run, and a little more: slurmd refuses
    ("Job credential revoked") a run of the job whose credential is not newer, in whole seconds, than the revocation.
    """
    def requeued_and_node_idle() -> bool:
        show = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
        node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
        return "JobState=PENDING" in show and " Restarts=0 " not in show and node == ["idle"]

    wait_until(requeued_and_node_idle, 90, "the job back in the queue after a requeue, on an idle node")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_requeued_job_resumes_from_its_checkpoint_and_finishes_at_the_same_step(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = launch.parse_args(["--config", str(DEMO), "--tasks-per-node", "2", "--time", "10",
                              *demo_overrides(demo_shards, out, STEPS)])
    job = launch.submit(args)
    try:
        wait_until(lambda: len(read_metrics(out)) >= 4, 180, "4 training steps")
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)  # SIGTERM to every task, SIGKILL 30 s later
        release_when_requeued(job.job_id)
        summary = launch.wait(job, scheduler_every_s=2)
    finally:
        subprocess.run(["scancel", job.job_id])

    log = job.task(0).stderr()
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert resumed, f"the requeued run did not resume:\n{log[-3000:]}"
    stop_step = int(resumed.group(2))
    assert 4 <= stop_step < STEPS and resumed.group(1).startswith(str(out / "checkpoints"))
    assert summary["preempted"] is False and summary["step"] == STEPS
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step lost, none done twice
    lrs = [r["lr"] for r in records]
    assert all(b > a for a, b in zip(lrs, lrs[1:])), "the warm-up schedule restarted instead of going on"


def test_after_the_preemption_notice_rank_0_requeues_the_job_through_submitit(tmp_path, monkeypatch):
    """SIGUSR2 reaches rank 0 only (the stand-in trainer sends it at step 4): all ranks save, rank 0 runs
    `scontrol requeue` from submitit's handler, the requeued run resumes (SLURM_RESTART_COUNT) and finishes."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the job unpickles slurm_fixtures.toy_train
    monkeypatch.setenv("FNE_TOY_NOTICE_AT", "4")
    monkeypatch.setenv("FNE_TOY_STEP_S", "0.2")
    config = tmp_path / "toy.yaml"
    config.write_text(f"data: {{train: toy}}\ntrain: {{steps: 12, output_dir: {tmp_path / 'run'}}}\n")
    job = launch.submit(launch.parse_args(["--config", str(config), "--tasks-per-node", "2", "--time", "10"]),
                        train_fn=toy_train)
    try:
        release_when_requeued(job.job_id)
        summary = launch.wait(job, scheduler_every_s=2)
    finally:
        subprocess.run(["scancel", job.job_id])
    assert summary == {"preempted": False, "start_step": 4, "world_size": 2, "step": 12}
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 13))
    assert job.submission().function.requeues == 1


def test_a_failing_job_shows_its_error_to_whoever_launched_it(demo_shards, tmp_path, capsys):
    overrides = demo_overrides(demo_shards, tmp_path / "run", 2) + [f"data.train={tmp_path}/none-{{0..1}}.tar"]
    assert launch.main(["--config", str(DEMO), "--tasks-per-node", "2", "--wait", *overrides]) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "2 of its files do not exist" in err  # the trainer's own message
    assert re.search(r"_0_log\.err", err), "the error names the log to read"


def test_impossible_resources_are_refused_with_sbatchs_message(capsys, tmp_path):
    argv = ["--config", str(DEMO), "--cpus-per-task", "512", "data.train=x", f"train.output_dir={tmp_path}"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert "the cluster refused the job" in err and "Batch job submission failed" in err


def test_example_sbatch_trains_with_plain_srun(demo_shards, tmp_path):
    """slurm/example.sbatch: every srun task runs fne-train and finds its rank in SLURM's variables."""
    venv_bin = str(Path(sys.executable).parent)  # fne-train; appended, so the same compilers/ninja stay first
    path = os.environ["PATH"] if venv_bin in os.environ["PATH"].split(":") else f"{os.environ['PATH']}:{venv_bin}"
    out = tmp_path / "run"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node", "2", f"--output={tmp_path}/slurm-%j.out",
         str(ROOT / "slurm" / "example.sbatch"), str(DEMO), *demo_overrides(demo_shards, out, 3)],
        env={**os.environ, "PATH": path}, cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    try:
        wait_until(lambda: squeue(job_id) == "", 240, "the example job to end")
    finally:
        subprocess.run(["scancel", job_id])
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (out / "summary.json").exists(), log[-3000:]
    step = out / "checkpoints" / "step000000003"
    assert sorted(p.name for p in step.glob("rng_rank*.pt")) == ["rng_rank00000.pt", "rng_rank00001.pt"], log[-3000:]
