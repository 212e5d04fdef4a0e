"""`fne-bench ema`: under ZeRO-3, the momentum towers' memory per rank, their EMA and their forward, sharded against a
full copy per rank.

Spawns `world` CPU processes in a gloo group (`--backend nccl`: an NCCL group, one GPU per rank); each builds the
towers (`--model`, open_clip name or JSON), wraps them in a ZeRO-3 engine (fp32 or bf16) and times, per optimizer
step, the full layout and then the sharded one (sharding partitions the full copy, so one group of ranks measures
both and starts once):
  sharded  the trainer's way: fp32 momentum towers partitioned by DeepSpeed (`shard_momentum`), the EMA on each
           rank's partitions (`momentum_update(..., zero3=True)`), the keys from a forward that gathers them;
  full     a full fp32 copy on every rank, the EMA reading the online weights inside `GatheredParameters` (a gather
           of the whole model), the keys from a local forward.
Reported: fp32 momentum MiB a rank holds, median EMA and keys (momentum forward) ms of the slowest rank.  Prints a
table and writes a CSV.
"""
from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fne_dist.bench.common import (Timer, add_backend_argument, append_csv, check_backend, print_table, rank_device,
                                     rank_file, spawn_ranks)

FIELDS = ("layout", "world", "model", "dtype", "params", "momentum_mib_per_rank", "ema_ms", "keys_ms", "batch",
          "backend")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench ema", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="configs/models/tiny-vit.json", help="open_clip model name or JSON")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the online towers' compute dtype")
    parser.add_argument("--batch", type=int, default=8, help="samples per rank for the momentum forward")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one untimed)")
    parser.add_argument("--csv", default="runs/bench/ema.csv")
    add_backend_argument(parser)
    args = parser.parse_args(argv)
    check_backend(parser, args.backend, args.world)
    return args


LAYOUTS = ("full", "sharded")  # the rows, in the order the same ranks measure them (`_worker`)


@dataclass
class Case:
    model: str
    world: int
    dtype: str
    batch: int
    steps: int
    backend: str


def _worker(rank: int, case: Case, port: int, out: str) -> None:
    import deepspeed

    from fne_dist.config import ModelSection
    from fne_dist.model import build_towers, encode
    from fne_dist.momentum import momentum_copy, momentum_update, shard_momentum

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(case.world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = rank_device(case.backend, rank)
    deepspeed.init_distributed(dist_backend=case.backend, verbose=False)
    torch.manual_seed(0)
    towers = build_towers(ModelSection(name=case.model))
    momentum = momentum_copy(towers.model).to(device)  # before deepspeed.initialize partitions the towers
    config = {"train_micro_batch_size_per_gpu": case.batch, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": case.dtype == "bf16"}, "steps_per_print": 2**31 - 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=towers.model, model_parameters=towers.model.parameters(), config=config)
    online = engine.module
    size = towers.architecture["vision_cfg"]["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(case.batch, 3, *size, device=device)
    tokens = towers.tokenizer([f"a photo of thing number {i}" for i in range(case.batch)]).to(device)

    def timed(ema, momentum, held: int) -> dict:
        """Median EMA and keys (momentum forward) ms over the steps after the first, and the bytes held."""
        timer, ema_ms, keys_ms = Timer(device), [], []
        for _ in range(case.steps + 1):
            dist.barrier()
            ema_ms.append(timer(ema))
            dist.barrier()
            with torch.no_grad():
                keys_ms.append(timer(lambda: encode(momentum, images, tokens)))
        return {"ema_ms": statistics.median(ema_ms[1:]), "keys_ms": statistics.median(keys_ms[1:]), "bytes": held}

    def full_ema():
        with deepspeed.zero.GatheredParameters(list(online.parameters())):
            momentum_update(online, momentum, 0.995)

    results = {"params": sum(p.ds_numel for p in online.parameters()),
               "full": timed(full_ema, momentum, sum(p.nbytes for p in momentum.parameters()))}
    sharded = shard_momentum(momentum, config["zero_optimization"])  # partitions the full copy: measured after it
    results["sharded"] = timed(lambda: momentum_update(online, sharded, 0.995, zero3=True), sharded,
                               sum(p.ds_tensor.nbytes for p in sharded.parameters()))
    torch.save(results, rank_file(out, rank))
    dist.barrier()
    dist.destroy_process_group()


def measure(case: Case) -> list[dict]:
    """Both layouts' rows, from one group of ranks."""
    ranks = spawn_ranks(_worker, case, case.world)
    return [{"layout": layout, "world": case.world, "model": os.path.basename(case.model), "dtype": case.dtype,
             "params": ranks[0]["params"],
             "momentum_mib_per_rank": round(max(r[layout]["bytes"] for r in ranks) / 2**20, 2),
             "ema_ms": round(max(r[layout]["ema_ms"] for r in ranks), 2),
             "keys_ms": round(max(r[layout]["keys_ms"] for r in ranks), 1), "batch": case.batch,
             "backend": case.backend}
            for layout in LAYOUTS]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = measure(Case(args.model, args.world, args.dtype, args.batch, args.steps, args.backend))
    print_table(rows, FIELDS)
    append_csv(rows, FIELDS, args.csv)
