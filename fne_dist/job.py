"""What runs on every task of a job that fne-launch submitted.

`TrainJob` is the callable submitit pickles and runs once per task.  It is `submitit.helpers.Checkpointable`, so
submitit can requeue it, but it does not let submitit's signal handler do the work: that handler runs on global
rank 0 only, inside the signal, possibly in the middle of a collective, while a DeepSpeed checkpoint needs every rank
in the main loop.  The order of events on a stop signal is:

1. The trainer's `StopRequest` handlers (SIGTERM, SIGUSR2) replace submitit's and only set a flag.
2. At the next step boundary every rank sees the flag through `StopRequest.agree()` (the step's one all-reduce,
   shared with its non-finite check), all ranks save a checkpoint together, and `train()` returns a summary with
   `"preempted": True`.
3. Back here: after SIGUSR2 (submitit's time-limit / preemption notice, `#SBATCH --signal=USR2@90`) global rank 0
   calls submitit's own handler, kept aside before training started.  It asks `checkpoint()` for the submission to
   requeue, dumps it, runs `scontrol requeue` (LocalExecutor: exit code 144) and exits.  After a bare SIGTERM
   (`scontrol requeue`, preemption by a higher-priority job, `scancel`) SLURM is already ending or requeueing the job,
   so every rank just leaves.  Either way no rank writes a result, so whoever waits on the job keeps waiting for
   the requeued run.
4. A requeued run resumes from the latest checkpoint of the same output directory (`train.resume=auto`).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

import submitit
from submitit.core.job_environment import JobEnvironment

from fne_dist.config import Config, from_dict
from fne_dist.distributed import export_distributed_env
from fne_dist.preemption import StopRequest

TrainFn = Callable[[Config], dict]


class RequeueLimitReached(RuntimeError):
    """A stopped job saved its checkpoint but has used up its requeues."""


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL says else)."""
    return signal.Signals["SIG" + JobEnvironment.USR_SIG]


def _trainer_train(cfg: Config) -> dict:
    from fne_dist.train import train  # imported in the job only: the launcher stays light

    return train(cfg)


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job: `config` is the validated config as a plain dict (see config.to_dict)."""

    def __init__(self, config: dict, max_requeues: int = 3, requeues: int = 0, train_fn: Optional[TrainFn] = None):
        self.config = config
        self.max_requeues = max_requeues
        self.requeues = requeues  # how many times this job requeued itself so far
        self.train_fn = train_fn or _trainer_train  # a stand-in for tests of the machinery

    def restarted(self) -> bool:
        """True in a requeued run: requeued by submitit through checkpoint(), or by SLURM itself."""
        return self.requeues > 0 or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0

    def __call__(self) -> dict:
        export_distributed_env()
        submitit_handler = signal.getsignal(preemption_signal())  # installed by submitit before this call
        cfg = from_dict(self.config)
        if self.restarted():
            cfg.train.resume, cfg.train.overwrite = "auto", False
        summary = self.train_fn(cfg)
        if summary.get("preempted") and callable(submitit_handler):
            self._leave_after_stop(submitit_handler)
        return summary

    def _leave_after_stop(self, submitit_handler) -> None:
        """Requeue (rank 0, after the preemption notice) or just leave, without a result (see the module doc)."""
        notice = preemption_signal()
        stop = StopRequest.installed()
        if stop is not None and notice.name in stop.signals and JobEnvironment().global_rank == 0:
            if self.requeues >= self.max_requeues:
                out = self.config["train"]["output_dir"]
                raise RequeueLimitReached(
                    f"the job stopped after {notice.name} and saved a checkpoint in {out}, but it was not requeued: "
                    f"it already requeued itself {self.requeues} times (--max-requeues {self.max_requeues}). "
                    "Submit it again with the override train.resume=latest to go on, and a larger --time or "
                    "--max-requeues.")
            submitit_handler(notice, None)  # checkpoint() -> dump -> requeue -> exit; raises if submitit refuses
        sys.exit(0)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The submission to requeue: the same run, one requeue further (the training state is on disk)."""
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, self.max_requeues, self.requeues + 1, self.train_fn))
