"""`fne-bench sampler ...` (the sampler kernels), `fne-bench step ...` (the trainer's FNE step against a CLIP step),
`fne-bench buffer ...` (the negative buffer's memory and step time against world and buffer size),
`fne-bench ema ...` (the momentum towers under ZeRO-3, sharded against a full copy) and `fne-bench data ...` (the
loader's samples/s per worker)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from fne_dist.cli import ArgumentParser

COMMANDS = {"sampler": "the sampler kernels against a matmul and the dense recipe (fne-bench sampler --help)",
            "step": "the trainer's FNE step against a CLIP step (fne-bench step --help)",
            "buffer": "buffer memory and step time against world and buffer size (fne-bench buffer --help)",
            "ema": "ZeRO-3 momentum towers per rank, EMA and forward time (fne-bench ema --help)",
            "data": "the loader's samples/s per worker and in total (fne-bench data --help)"}


def print_table(rows: list[dict], fields) -> None:
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in fields}
    print("  ".join(k.ljust(widths[k]) for k in fields))
    for row in rows:
        print("  ".join(str(row[k]).ljust(widths[k]) for k in fields))


def append_csv(rows: list[dict], fields, path: str | Path) -> None:
    """Append the rows to a CSV (header written when the file is new), so that runs accumulate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended to {path}")


def spawn_ranks(worker, case, world: int) -> list[dict]:
    """Run `worker(rank, case, port, out)` in `world` spawned CPU processes (one gloo group on a free port); each
    saves its result dict to `rank_file(out, rank)`.  Returns the results in rank order."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from fne_dist.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(case, free_port(), out), nprocs=world)
        return [torch.load(rank_file(out, r)) for r in range(world)]


def rank_file(out: str, rank: int) -> str:
    return f"{out}/rank{rank}.pt"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = ArgumentParser(prog="fne-bench", description=__doc__.splitlines()[0],
                                epilog="  ".join(f"{name}: {what}." for name, what in COMMANDS.items()))
        parser.add_argument("command", choices=tuple(COMMANDS))
        parser.parse_args(argv)  # --help (exit 0) or a usage error (exit 2)
    if argv[0] == "sampler":
        from fne_kernels.bench_sampler import main as run
    elif argv[0] == "step":
        from fne_dist.bench_step import main as run
    elif argv[0] == "buffer":
        from fne_dist.bench_buffer import main as run
    elif argv[0] == "ema":
        from fne_dist.bench_ema import main as run
    else:
        from fne_dist.bench_data import main as run
    run(argv[1:])


if __name__ == "__main__":
    main()
