"""What every console script shares: bad input is one `prog: error: ...` line on stderr and exit status 2, never a
traceback.  Under a launcher every rank parses the same arguments and reads the same config, so only rank 0 says
it; an error that can strike one rank alone (a checkpoint write) is said by the rank it struck."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from fne_dist.checkpoint import CheckpointError, CheckpointWriteError, OutputDirError
from fne_dist.config import ConfigError
from fne_dist.data.shards import DataError
from fne_dist.distributed import DistributedEnvError, rank_from_env

EXIT_USAGE = 2
# Problems of the input or the environment that the message explains and the user fixes.
USER_ERRORS = (ConfigError, DataError, DistributedEnvError, CheckpointError, OutputDirError, CheckpointWriteError,
               FileNotFoundError)
# Library log lines that are not the user's business: DeepSpeed's "CPU" (the user has no GPU to detect) and its
# scheduler asked for a rate before its first step by DeepSpeed itself (its warning of a warm-up longer than the
# run is said by fne-train instead, with the value to use); open_clip's "initialized randomly" for a model that
# fne-dist builds from a config and then loads from a checkpoint or pretrained towers, as the config says.
NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started",
         "is less than warmup_num_steps", "No pretrained weights loaded for model")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in NOISE)


def quiet_libraries() -> None:
    """Drop the library log lines of NOISE: DeepSpeed's logger and the root logger (open_clip's) keep these
    filters when the libraries configure them."""
    for logger in (logging.getLogger("DeepSpeed"), logging.getLogger()):
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def say_error(prog: str, message: str, every_rank: bool = False) -> None:
    if every_rank or rank_from_env() == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are said by rank 0 only (exit status 2, as argparse's own)."""

    def error(self, message: str):
        if rank_from_env() == 0:
            self.print_usage(sys.stderr)
        say_error(self.prog, message)
        sys.exit(EXIT_USAGE)


def run(prog: str, main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """main(argv), with USER_ERRORS turned into one error line and exit status 2, library noise filtered."""
    quiet_libraries()
    try:
        return main(argv)
    except USER_ERRORS as err:
        say_error(prog, str(err), every_rank=getattr(err, "rank_specific", False))
        return EXIT_USAGE
