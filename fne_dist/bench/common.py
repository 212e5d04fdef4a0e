"""What the `fne-bench` subcommands share: the printed table, the CSV they append to, gloo ranks for the
multi-rank benchmarks."""
from __future__ import annotations

import csv
from pathlib import Path


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
