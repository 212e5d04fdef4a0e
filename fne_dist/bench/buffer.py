"""`fne-bench buffer`: per-rank memory and step time of the negative buffer against world size and buffer size.

Spawns `world` CPU processes in a gloo group (`--backend nccl`: an NCCL group, one GPU per rank); each runs
`Objective.loss`, its backward and `commit` (the trainer's FNE part of a step: key all-gather, statistics, the
objective over the whole buffer in both directions - `--objective fne`: the draw and the hinge, `posterior_infonce`:
the streamed InfoNCE - the loss's gradient, the enqueue) on random unit features against a full buffer, with the
Bayes rule on.  Two sweeps: world sizes at a fixed global buffer, and buffer sizes at a fixed world.  Reported per
run: the buffer bytes a rank holds (its ring slots) and the median step time of the slowest rank.  Prints a table
and writes a CSV.
"""
from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fne_dist.bench.common import (Timer, add_backend_argument, append_csv, check_backend, rank_device, rank_file,
                                   spawn_ranks)
from fne_dist.config import FNESection
from fne_dist.objective import Objective
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats

OBJECTIVES = ("fne", "posterior_infonce")  # those that read the whole buffer

FIELDS = ("objective", "layout", "world", "queue", "dim", "batch_per_rank", "buffer_mib_per_rank", "step_ms",
          "backend")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench buffer", description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("sharded", "replicated"), default="sharded")
    parser.add_argument("--objective", choices=OBJECTIVES, default="fne", help="the objective over the buffer")
    parser.add_argument("--worlds", default="1,2,4", help="world sizes of the first sweep")
    parser.add_argument("--queue", type=int, default=65536, help="global buffer of the first sweep")
    parser.add_argument("--queues", default="16384,65536,262144", help="buffer sizes of the second sweep")
    parser.add_argument("--world", type=int, default=2, help="world size of the second sweep")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="anchors per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed)")
    parser.add_argument("--csv", default="runs/bench/buffer.csv")
    add_backend_argument(parser)
    args = parser.parse_args(argv)
    check_backend(parser, args.backend, max(args.world, *(int(w) for w in args.worlds.split(","))))
    return args


@dataclass
class Case:
    objective: str
    layout: str
    world: int
    queue: int
    dim: int
    batch: int
    steps: int
    backend: str


def fill(objective, dim: int, device: torch.device) -> None:
    """A full buffer (the same keys on every rank; where the objective has one), and statistics that already switch
    the Bayes rule on: the steady state that `fne-bench buffer` and `fne-bench step` time."""
    objective.stats = SimilarityStats.from_moments(count_pos=10_000, mean_pos=0.6, var_pos=0.01, mean_neg=0.3,
                                                   var_neg=0.02, reset="never", device=device)
    if objective.buffer is None:
        return
    size = objective.buffer.queue.size
    g = torch.Generator(device="cpu").manual_seed(0)
    keys = [F.normalize(torch.randn(size, dim, generator=g), dim=1).to(device) for _ in range(2)]
    ids = torch.arange(size, device=device) + 10**9  # never equal to the batch's ids
    objective.buffer.enqueue(GlobalKeys(*keys, ids, torch.full_like(ids, -1)))


def _worker(rank: int, case: Case, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = rank_device(case.backend, rank)
    dist.init_process_group(case.backend, rank=rank, world_size=case.world)
    cfg = FNESection(objective=case.objective, queue_size=case.queue, mode="bayes", buffer=case.layout,
                     impl="auto")  # triton on a GPU
    objective = Objective(cfg, case.dim, device, seed=0)
    fill(objective, case.dim, device)
    g = torch.Generator().manual_seed(1)
    # the same stream on every rank
    unit = lambda n: F.normalize(torch.randn(n, case.dim, generator=g), dim=1).to(device)  # noqa: E731
    timer, times = Timer(device), []
    for step in range(case.steps + 1):
        feats = [unit(case.batch).requires_grad_(online) for online in (True, True, False, False)]  # ia, ta, ik, tk
        ids = torch.arange(case.batch, device=device) + case.batch * (case.world * step + rank)
        scale = torch.tensor([1 / 0.07], device=device, requires_grad=True) if objective.scaled else None

        def fne_part():
            out = objective.loss(*feats, ids, torch.full_like(ids, -1), step=step, rank=rank, warmup=False,
                                 logit_scale=scale)
            out.loss.backward()
            objective.commit(out)

        dist.barrier()
        times.append(timer(fne_part))
    q = objective.buffer.queue
    held = sum(getattr(q, name).nbytes for name in q.BUFFERS)
    torch.save({"ms": statistics.median(times[1:]), "bytes": held}, rank_file(out, rank))
    dist.destroy_process_group()


def measure(case: Case) -> dict:
    ranks = spawn_ranks(_worker, case, case.world)
    return {"objective": case.objective, "layout": case.layout, "world": case.world, "queue": case.queue,
            "dim": case.dim, "batch_per_rank": case.batch,
            "buffer_mib_per_rank": round(max(r["bytes"] for r in ranks) / 2**20, 2),
            "step_ms": round(max(r["ms"] for r in ranks), 1), "backend": case.backend}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cases = [Case(args.objective, args.layout, int(w), args.queue, args.dim, args.batch, args.steps, args.backend)
             for w in args.worlds.split(",")]
    cases += [Case(args.objective, args.layout, args.world, int(q), args.dim, args.batch, args.steps, args.backend)
              for q in args.queues.split(",")]
    rows = []
    print("  ".join(FIELDS))
    for case in cases:
        rows.append(measure(case))
        print("  ".join(str(rows[-1][k]) for k in FIELDS), flush=True)
    append_csv(rows, FIELDS, args.csv)
