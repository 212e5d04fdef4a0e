"""A stop request that every rank agrees on at a step boundary.

SLURM and submitit deliver preemption and time-limit signals to some ranks only (submitit's
checkpoint() runs on global rank 0), while a DeepSpeed checkpoint needs every rank.  A signal only
sets a local flag; `should_stop()` all-reduces it (max) once per step, so all ranks see the same answer
at the same step, save together, and exit.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from fne_dist.distributed import is_distributed


class StopRequest:
    def __init__(self, device: torch.device | str = "cpu"):
        self.requested = False
        self.signal_name: str | None = None
        self.device = device

    def request(self, signum: int | None = None, frame=None) -> None:
        """Ask every rank to stop at the next step boundary (usable as a signal handler)."""
        self.requested = True
        if signum is not None:
            self.signal_name = signal.Signals(signum).name

    def install(self, signals=(signal.SIGTERM, signal.SIGUSR2)) -> None:
        for sig in signals:
            signal.signal(sig, self.request)

    def should_stop(self) -> bool:
        """True on every rank if any rank was asked to stop (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
