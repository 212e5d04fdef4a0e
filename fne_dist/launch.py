"""fne-launch: submit a training run to SLURM through submitit (or run it here with --cluster local / debug).

    fne-launch --config configs/laion_vitb32.yaml --nodes 16 --gpus-per-node 8 --partition gpu --time 1440
    fne-launch --config configs/demo.yaml --cluster local --tasks-per-node 2 train.steps=20 --wait

The config is loaded and checked (including the queue against the global batch of this many tasks) before anything
is queued, so a bad config never waits in the queue.  The job itself is `fne_dist.job.TrainJob`: it sets up the
distributed environment with submitit's helpers, calls the same `train()` as fne-train, and survives preemption and
time limits by saving on every rank, requeueing and resuming (slurm/README.md explains how).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from fne_dist.checkpoint import OutputDirError, prepare_output_dir
from fne_dist.config import ConfigError, check_world, load_config, to_dict
from fne_dist.job import TrainFn, TrainJob

CLUSTERS = ("slurm", "local", "debug")
# States after which SLURM will not run the job again (anything else may still run or be requeued).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class LaunchError(RuntimeError):
    """A launch that cannot go ahead, with the reason and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fne-launch", description=__doc__.split("\n\n")[0],
        epilog="Positional arguments are dotted config overrides, e.g. train.steps=1000 data.batch_size=64.")
    p.add_argument("--config", required=True, help="run config (YAML), e.g. configs/flickr30k_vitb16.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm (default); local: tasks as processes on this machine (submitit's LocalExecutor); "
                        "debug: one task in this process (an error opens pdb)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node for CPU runs (with GPUs it is --gpus-per-node); default 1")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (data workers + 1 is a start)")
    p.add_argument("--mem", type=float, default=None, metavar="GB", help="memory per node in GB")
    p.add_argument("--time", type=int, default=60, metavar="MINUTES",
                   help="time limit of one run (default 60); the job saves and requeues itself before it")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-name", help="default: fne-<config name>")
    p.add_argument("--log-dir", type=Path,
                   help="submitit's folder (logs, pickles); default <train.output_dir>/submitit")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="extra sbatch option, repeatable: --sbatch exclusive --sbatch mail-type=END "
                        "--sbatch signal=USR2@300 (more time to save than the default 90 s)")
    p.add_argument("--max-requeues", type=int, default=3,
                   help="how many times the job may requeue itself after a time limit or preemption notice")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job; print its result, or its error and log paths (exit status 1)")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse and check the options that do not depend on the config."""
    args = build_parser().parse_intermixed_args(argv)
    if args.gpus_per_node < 0 or args.nodes < 1 or args.max_requeues < 0 or args.time < 1:
        raise LaunchError("--nodes and --time must be >= 1, --gpus-per-node and --max-requeues >= 0")
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise LaunchError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                          "GPU runs use one task per GPU, so leave --tasks-per-node out")
    args.tasks_per_node = args.gpus_per_node or args.tasks_per_node or 1
    if args.tasks_per_node < 1:
        raise LaunchError("--tasks-per-node must be >= 1")
    if args.cluster != "slurm" and args.nodes > 1:
        raise LaunchError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1, or --cluster slurm")
    if args.cluster == "debug" and args.tasks_per_node > 1:
        raise LaunchError("--cluster debug runs one task in this process: use --cluster local for several tasks")
    args.sbatch = sbatch_options(args.sbatch)
    args.wait = args.wait or args.cluster == "debug"  # a debug job runs only when its result is asked for
    return args


def sbatch_options(items: list[str]) -> dict:
    """'key=value' -> {key: value}; a bare 'key' is a flag (sbatch --key)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise LaunchError(f"--sbatch {item!r}: give an sbatch option as KEY=VALUE or KEY, e.g. mail-type=END")
        out[key] = value if eq else True
    return out


def make_executor(args: argparse.Namespace, log_dir: Path, job_name: str) -> submitit.AutoExecutor:
    try:
        executor = submitit.AutoExecutor(folder=log_dir / "%j", cluster=args.cluster,
                                         slurm_max_num_timeout=args.max_requeues,
                                         local_max_num_timeout=args.max_requeues)
    except RuntimeError as err:  # SlurmExecutor without srun on the PATH
        raise LaunchError(f"{err}: use --cluster local to run on this machine, or start a test cluster "
                          "with slurm/local_cluster.sh up") from None
    executor.update_parameters(
        name=job_name, nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem, timeout_min=args.time,
        slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
        slurm_constraint=args.constraint, slurm_additional_parameters=args.sbatch or None,
        # A task that fails ends the step, so its peers do not hang in a collective until a timeout.
        slurm_srun_args=["--kill-on-bad-exit=1"])
    return executor


def submit(args: argparse.Namespace, train_fn: Optional[TrainFn] = None):
    """Check the config against the requested tasks, then queue the job; returns submitit's Job."""
    cfg = load_config(args.config, args.overrides)
    check_world(cfg, args.nodes * args.tasks_per_node)
    if not cfg.train.overwrite:  # the job deletes with overwrite; here only what would make it fail at once
        prepare_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=False)
    log_dir = (args.log_dir or Path(cfg.train.output_dir) / "submitit").resolve()
    job_name = args.job_name or f"fne-{Path(args.config).stem}"
    executor = make_executor(args, log_dir, job_name)
    with submitit.helpers.clean_env():  # a launch from inside a job must not pass on that job's ranks
        try:
            return executor.submit(TrainJob(to_dict(cfg), args.max_requeues, train_fn=train_fn))
        except FailedJobError as err:  # sbatch's own message
            raise LaunchError(f"the cluster refused the job: {err}") from None


def _slurm_final_state(job_id: str) -> Optional[str]:
    """The job's state once SLURM is done with it, else None (squeue also answers without accounting)."""
    run = subprocess.run(["squeue", "-h", "-j", job_id, "--states=all", "-o", "%T"], capture_output=True, text=True)
    if "Invalid job id" in run.stderr:
        return "GONE"  # purged from the controller (MinJobAge after its end): not coming back
    state = run.stdout.strip()
    return state if state in FINAL_STATES else None  # None also while squeue cannot reach the controller


def _ended(job) -> Optional[str]:
    if isinstance(job, submitit.SlurmJob):
        return _slurm_final_state(job.job_id)
    return "FINISHED" if job.done() else None


def wait(job, scheduler_every_s: float = 30.0, results_grace_s: float = 15.0):
    """Wait for the job and return rank 0's result; on failure raise the error of the lowest task that failed
    (rank 0's, whose log holds the trainer's one error line, whenever rank 0 failed too), which names its logs.

    Tasks that stop for a requeue write no result, so waiting goes on through requeues.  Results are looked for
    every second; the scheduler is asked only every `scheduler_every_s` whether the job ended without them (killed,
    cancelled, out of time or memory), through squeue, since submitit's watcher needs SLURM accounting.  Once it has
    ended, a shared file system gets `results_grace_s` to show the results its tasks wrote.
    """
    if isinstance(job, submitit.DebugJob):
        return job.result()  # runs it here, now
    tasks = [job.task(k) for k in range(job.num_tasks)]
    pending, state, asked, ended = list(tasks), None, float("-inf"), None
    failed, first_failure = {}, None  # task -> error; when the first failure was seen
    while pending:
        for t in [t for t in pending if t.paths.result_pickle.exists()]:
            error = t.exception()
            if error is not None:
                failed[t.task_id] = error
            pending.remove(t)
        now = time.monotonic()
        if failed:
            first_failure = first_failure or now
            # the lower tasks get the grace period to report too, so that the error is the same on every run
            if min(failed) == 0 or not pending or now - first_failure > results_grace_s:
                raise failed[min(failed)]
        if ended is None and now - asked >= scheduler_every_s:
            state, asked = _ended(job), now
            ended = now if state else None
        if not pending or (ended is not None and now - ended > results_grace_s):
            break
        time.sleep(1)
    if failed:
        raise failed[min(failed)]
    if tasks[0] in pending:
        raise UncompletedJobError(f"job {job.job_id} ended ({state}) without a result; see its logs:\n"
                                  f"  {tasks[0].paths.stderr}\n  {tasks[0].paths.stdout}")
    return tasks[0].result()


def describe(job, args: argparse.Namespace) -> str:
    rank0 = job.task(0).paths
    what = f"{args.nodes} node(s) x {args.tasks_per_node} task(s)"
    what += f", {args.gpus_per_node} GPU(s) per node" if args.gpus_per_node else " (CPU)"
    lines = [f"fne-launch: submitted job {job.job_id} to {args.cluster}: {what}, {args.time} min per run, "
             f"up to {args.max_requeues} requeue(s)",
             f"  logs:   {rank0.stderr} (rank 0; rank k: {job.job_id}_k_log.err / .out)"]
    if not args.wait:
        follow = f"tail -f {rank0.stderr}"
        if args.cluster == "slurm":
            follow += f"  |  squeue -j {job.job_id}  |  stop: scancel {job.job_id}"
        lines.append(f"  follow: {follow}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
        job = submit(args)
    except (LaunchError, ConfigError, OutputDirError) as err:
        print(f"fne-launch: error: {err}", file=sys.stderr)
        return 2
    print(describe(job, args), flush=True)
    if not args.wait:
        return 0
    try:
        summary = wait(job)
    except UncompletedJobError as err:  # FailedJobError too: the trace and the log paths
        print(f"fne-launch: job {job.job_id} failed:\n{err}", file=sys.stderr)
        return 1
    print(f"fne-launch: job {job.job_id} finished: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
