"""A stop request that every rank agrees on at a step boundary.

SLURM and submitit deliver preemption and time-limit signals to some ranks only (submitit's handler acts on global
rank 0 only), while a DeepSpeed checkpoint needs every rank.  So a signal handler here does nothing but set a local
flag (saving inside a handler would interrupt the main loop in the middle of a step, possibly inside a collective);
`agree()` all-reduces the flag (max) once per step together with the step's non-finite check, so all ranks see the
same answer at the same step, save together in the main loop, and leave.

The request remembers which signals arrived, because the right exit depends on them (see fne_dist/job.py): after
SIGUSR2 (submitit's time-limit / preemption notice) the job requeues itself, after SIGTERM SLURM is already ending or
requeueing it.  Signal handlers are process-wide, so the request whose handlers are installed is too:
`StopRequest.installed()` finds it, wherever it was created.
"""
from __future__ import annotations

import signal
from typing import ClassVar, Optional

import torch
import torch.distributed as dist

from fne_dist.distributed import all_reduce

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    _installed: ClassVar[Optional["StopRequest"]] = None

    def __init__(self):
        self.requested = False
        self.signals: list[str] = []  # names of the signals received, in order
        self._previous: dict = {}  # the handlers that `install` replaced

    def request(self, signum: int | None = None, frame=None) -> None:
        """Ask every rank to stop at the next step boundary (usable as a signal handler)."""
        self.requested = True
        if signum is not None:
            self.signals.append(signal.Signals(signum).name)

    @property
    def signal_name(self) -> Optional[str]:
        """The last signal received (for messages), or None."""
        return self.signals[-1] if self.signals else None

    def install(self, signals=STOP_SIGNALS) -> None:
        """Make these signals (SIGTERM and SIGUSR2 by default) set this request, replacing earlier handlers."""
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self.request)
        StopRequest._installed = self

    def restore(self) -> None:
        """Put back the handlers that `install` replaced (training is over: a signal now acts at once again,
        so a launcher that stops the other ranks after one exits is not kept waiting).  `installed()` still
        finds this request and the signals it received."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @classmethod
    def installed(cls) -> Optional["StopRequest"]:
        """The request whose handlers were installed last in this process, or None."""
        return cls._installed

    def agree(self, bad: torch.Tensor) -> tuple[bool, bool]:
        """(any rank's `bad` is true, any rank was asked to stop): both from one all-reduce and one host sync, so a
        training step that must check its values anyway pays nothing more for the stop request."""
        flag = torch.stack([bad.float().reshape(()), torch.zeros((), device=bad.device).fill_(float(self.requested))])
        bad_anywhere, stop = all_reduce(flag, op=dist.ReduceOp.MAX).tolist()
        return bool(bad_anywhere), bool(stop)
