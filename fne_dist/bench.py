"""`fne-bench sampler ...` (the sampler kernels), `fne-bench step ...` (an FNE step against a CLIP step) and
`fne-bench data ...` (the loader's samples/s per worker)."""
from __future__ import annotations

import sys

USAGE = "usage: fne-bench {sampler,step,data} [options]  (fne-bench sampler --help for the options)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("sampler", "step", "data"):
        raise SystemExit(USAGE)
    if argv[0] == "sampler":
        from fne_kernels.bench_sampler import main as run
    elif argv[0] == "step":
        from fne_dist.bench_step import main as run
    else:
        from fne_dist.bench_data import main as run
    run(argv[1:])


if __name__ == "__main__":
    main()
