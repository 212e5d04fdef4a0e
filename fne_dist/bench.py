"""`fne-bench sampler ...` (the sampler kernels), `fne-bench step ...` (the trainer's FNE step against a CLIP step),
`fne-bench buffer ...` (the negative buffer's memory and step time against world and buffer size),
`fne-bench ema ...` (the momentum towers under ZeRO-3, sharded against a full copy) and `fne-bench data ...` (the
loader's samples/s per worker)."""
from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from fne_dist.cli import ArgumentParser

BACKENDS = ("gloo", "nccl")  # of the spawned ranks' process group (`fne-bench buffer`, `fne-bench ema`)
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
    def __init__(self, device):
        self.device = device

    def __call__(self, fn) -> float:
        """Milliseconds of fn(), the device drained before and after."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1000 * (time.perf_counter() - start)


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
