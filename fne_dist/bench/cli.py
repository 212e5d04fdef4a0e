"""`fne-bench sampler ...` (the sampler kernels), `fne-bench infonce ...` (the posterior InfoNCE kernels),
`fne-bench step ...` (the trainer's FNE step against a CLIP step), `fne-bench buffer ...` (the negative buffer's
memory and step time against world and buffer size), `fne-bench ema ...` (the momentum towers under ZeRO-3, sharded
against a full copy) and `fne-bench data ...` (the loader's samples/s per worker)."""
from __future__ import annotations

import sys

from fne_dist.cli import ArgumentParser

COMMANDS = {"sampler": "the sampler kernels against a matmul and the dense recipe (fne-bench sampler --help)",
            "infonce": "the posterior InfoNCE against its three matmuls (fne-bench infonce --help)",
            "step": "the trainer's FNE step against a CLIP step (fne-bench step --help)",
            "buffer": "buffer memory and step time against world and buffer size (fne-bench buffer --help)",
            "ema": "ZeRO-3 momentum towers per rank, EMA and forward time (fne-bench ema --help)",
            "data": "the loader's samples/s per worker and in total (fne-bench data --help)"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = ArgumentParser(prog="fne-bench", description=__doc__.splitlines()[0],
                                epilog="  ".join(f"{name}: {what}." for name, what in COMMANDS.items()))
        parser.add_argument("command", choices=tuple(COMMANDS))
        parser.parse_args(argv)  # --help (exit 0) or a usage error (exit 2)
    if argv[0] == "sampler":
        from fne_kernels.bench_sampler import main as run
    elif argv[0] == "infonce":
        from fne_kernels.bench_infonce import main as run
    elif argv[0] == "step":
        from fne_dist.bench.step import main as run
    elif argv[0] == "buffer":
        from fne_dist.bench.buffer import main as run
    elif argv[0] == "ema":
        from fne_dist.bench.ema import main as run
    else:
        from fne_dist.bench.data import main as run
    run(argv[1:])

