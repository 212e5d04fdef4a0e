"""What the `fne-bench` subcommands share: the printed table, the CSV they append to, gloo ranks for the
multi-rank benchmarks."""
from __future__ import annotations

import csv
import time
from pathlib import Path

BACKENDS = ("gloo", "nccl")  # of the spawned ranks' process group (`fne-bench buffer`, `fne-bench ema`)


def print_table(rows: list[dict], fields) -> None:
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in fields}
    print("  ".join(k.ljust(widths[k]) for k in fields))
    for row in rows:
        print("  ".join(str(row[k]).ljust(widths[k]) for k in fields))


def append_csv(rows: list[dict], fields, path: str | Path) -> None:
    """Append the rows to a CSV (header written when the file is new), so that runs accumulate.  A file whose header
    names other columns (another benchmark's, or this one's before a column was added) is refused before anything
    is written: rows under the wrong header would be read as other figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(fields):
            raise SystemExit(f"{path} holds other columns ({','.join(header)}) than this benchmark writes "
                             f"({','.join(fields)}): pass another --csv, or move that file aside")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended to {path}")


def add_backend_argument(parser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="gloo",
                        help="process group of the ranks: gloo (CPU) or nccl (one CUDA GPU per rank)")


def check_backend(parser, backend: str, world: int) -> None:
    """Before any rank starts: nccl needs a CUDA GPU per rank, else one usage error (exit 2)."""
    import torch

    gpus = torch.cuda.device_count()
    if backend == "nccl" and gpus < world:
        parser.error(f"--backend nccl needs one CUDA GPU per rank ({world} ranks, {gpus} GPUs here): use "
                     "--backend gloo (CPU), or fewer ranks")


def rank_device(backend: str, rank: int):
    """The device of a spawned rank: its own GPU under nccl (made current), else the CPU."""
    import torch

    if backend != "nccl":
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


class Timer:
    """clock "wall" (perf_counter) or "process" (this process's CPU time: readable on a shared machine)."""

    def __init__(self, device, clock: str = "wall"):
        self.device = device
        self.clock = time.perf_counter if clock == "wall" else time.process_time

    def __call__(self, fn) -> float:
        """Milliseconds of fn() on the clock, the device drained before and after."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = self.clock()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1000 * (self.clock() - start)


def spawn_ranks(worker, case, world: int) -> list[dict]:
    """Run `worker(rank, case, port, out)` in `world` spawned processes (the worker joins them in one process group
    on a free port); each saves its result dict to `rank_file(out, rank)`.  Returns the results in rank order."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from fne_dist.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(case, free_port(), out), nprocs=world)
        return [torch.load(rank_file(out, r)) for r in range(world)]


def rank_file(out: str, rank: int) -> str:
    return f"{out}/rank{rank}.pt"
