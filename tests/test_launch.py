"""fne-launch without a SLURM cluster: checks before submission, the debug and local executors, the stop agreement,
the distributed environment of every launch path, and the requeue after submitit's preemption notice."""
from __future__ import annotations

import json
import os
import signal
from unittest import mock

import pytest
import torch.multiprocessing as mp

from fne_dist import job as job_module
from fne_dist import launch
from fne_dist.config import load_config, to_dict
from fne_dist.distributed import export_distributed_env
from slurm_fixtures import DEMO, TESTS, agree_on_stop, demo_overrides, demo_shards, read_metrics, toy_train  # noqa: F401

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def nothing_submitted(monkeypatch):
    """Fail the test if anything reaches an executor."""
    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(launch, "make_executor", refuse)


@pytest.mark.parametrize("argv, message", [
    (["fne.queue_sise=4096"], "unknown config key 'fne.queue_sise'"),
    (["train.steps=many"], "train.steps"),
    (["--nodes", "2", "--gpus-per-node", "8", "fne.queue_size=256"], "smaller than the global batch 512"),
])
def test_a_bad_config_never_reaches_the_queue(argv, message, nothing_submitted, capsys):
    assert launch.main(["--config", str(DEMO), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fne-launch: error:") and message in err


def test_a_folder_with_another_runs_checkpoints_never_reaches_the_queue(tmp_path, nothing_submitted, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step000000010")
    assert launch.main(["--config", str(DEMO), f"train.output_dir={tmp_path}"]) == 2
    assert "holds the checkpoints of an earlier run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--config", "no/such.yaml"], "does not exist"),
    (["--config", str(DEMO), "--gpus-per-node", "8", "--tasks-per-node", "4"], "one task per GPU"),
    (["--config", str(DEMO), "--cluster", "local", "--nodes", "2"], "--nodes 1"),
    (["--config", str(DEMO), "--cluster", "debug", "--tasks-per-node", "2"], "--cluster local"),
    (["--config", str(DEMO), "--sbatch", "=5"], "KEY=VALUE"),
])
def test_bad_options_are_refused_with_the_fix(argv, message, nothing_submitted, capsys):
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err


def test_sbatch_pass_through():
    assert launch.sbatch_options(["mail-type=END", "--exclusive", "signal=USR2@300"]) == {
        "mail-type": "END", "exclusive": True, "signal": "USR2@300"}


def test_debug_cluster_runs_the_trainer_in_this_process(demo_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert launch.main(["--config", str(DEMO), "--cluster", "debug", *demo_overrides(demo_shards, out, 3)]) == 0
    printed = capsys.readouterr().out
    assert "submitted job DEBUG_" in printed and "'preempted': False, 'step': 3" in printed
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "checkpoints").is_dir()


def test_stop_request_all_ranks_agree_on_the_step(tmp_path, port):
    mp.spawn(agree_on_stop, args=(2, port, str(tmp_path), 1, 3), nprocs=2)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["step"] for s in seen] == [3, 3]  # the signalled rank and the other one, at the same step
    assert [s["signals"] for s in seen] == [[], ["SIGTERM"]]


def test_local_job_saves_on_every_rank_requeues_after_the_notice_and_resumes(tmp_path, monkeypatch):
    """Rank 0 alone gets SIGUSR2 at step 4: both ranks save at the same step, submitit requeues, the run resumes."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the job unpickles slurm_fixtures.toy_train
    monkeypatch.setenv("FNE_TOY_NOTICE_AT", "4")
    config = tmp_path / "toy.yaml"
    config.write_text(f"data: {{train: toy}}\ntrain: {{steps: 12, output_dir: {tmp_path / 'run'}}}\n")
    args = launch.parse_args(["--config", str(config), "--cluster", "local", "--tasks-per-node", "2",
                              "--max-requeues", "1"])
    job = launch.submit(args, train_fn=toy_train)
    summary = launch.wait(job, scheduler_every_s=1)
    assert summary == {"preempted": False, "start_step": 4, "world_size": 2, "step": 12}
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 13))
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt" / "step_4").iterdir()) == ["rank0.json", "rank1.json"]
    assert job.submission().function.requeues == 1


def test_the_requeue_limit_ends_the_job_with_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("FNE_TOY_NOTICE_AT", "2")
    config = tmp_path / "toy.yaml"
    config.write_text(f"data: {{train: toy}}\ntrain: {{steps: 12, output_dir: {tmp_path / 'run'}}}\n")
    args = launch.parse_args(["--config", str(config), "--cluster", "local", "--tasks-per-node", "2",
                              "--max-requeues", "0"])
    with pytest.raises(Exception, match="--max-requeues 0") as failure:
        launch.wait(launch.submit(args, train_fn=toy_train), scheduler_every_s=1)
    assert "_log.err" in str(failure.value)  # the error names the log to read
    assert (tmp_path / "run" / "ckpt" / "step_2" / "rank1.json").exists()


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}),
    ({"RANK": "3", "WORLD_SIZE": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     {"RANK": "3", "WORLD_SIZE": "4"}),  # torchrun / deepspeed inside srun: theirs win
    ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, {}),  # the batch script: one process
])
def test_distributed_environment_of_a_plain_srun_step(env, expected):
    with mock.patch.dict(os.environ, env, clear=True):
        export_distributed_env()
        got = {k: os.environ[k] for k in DIST_VARS if k in os.environ}
        port = got.pop("MASTER_PORT", None)
    assert got == expected
    if "MASTER_ADDR" in expected:
        with mock.patch.dict(os.environ, env, clear=True):
            export_distributed_env()
            assert os.environ["MASTER_PORT"] == port  # every task of the job draws the same port


def test_preemption_signal_is_submitits():
    assert job_module.preemption_signal() == signal.SIGUSR2


def test_a_requeued_job_resumes_and_never_overwrites(tmp_path):
    seen = []
    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}", "train.overwrite=true"])
    job_module.TrainJob(to_dict(cfg), requeues=1, train_fn=lambda c: seen.append(c) or {"preempted": False})()
    assert (seen[0].train.resume, seen[0].train.overwrite) == ("auto", False)
