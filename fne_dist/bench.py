"""`fne-bench sampler ...` (the sampler kernels), `fne-bench step ...` (the trainer's FNE step against a CLIP step)
and `fne-bench buffer ...` (the negative buffer's memory and step time against world and buffer size)."""
from __future__ import annotations

import sys

USAGE = "usage: fne-bench {sampler,step,buffer} [options]  (fne-bench sampler --help for the options)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("sampler", "step", "buffer"):
        raise SystemExit(USAGE)
    if argv[0] == "sampler":
        from fne_kernels.bench_sampler import main as run
    elif argv[0] == "step":
        from fne_dist.bench_step import main as run
    else:
        from fne_dist.bench_buffer import main as run
    run(argv[1:])


if __name__ == "__main__":
    main()
