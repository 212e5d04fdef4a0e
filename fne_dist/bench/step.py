"""`fne-bench step`: what the trainer's step of an objective costs next to a plain CLIP step, on the same model and
batch.

The objective's step (`--objective`, default fne) is `Trainer.train_step` itself (one rank, DeepSpeed engine,
compute dtype from the deepspeed section): momentum keys (or with `--keys online` the online features, detached: no
momentum forward and no EMA), online features, the loss from a full buffer with the posterior on (statistics past
min_count; every term of the objective on: no warm-up, clip_queue's memory term from the first epoch), the one host
sync of the finite check and the stop request, backward, AdamW, the EMA, the statistics and the enqueue.  The CLIP
step is open_clip's recipe in a DeepSpeed engine of the same settings: forward both towers, ClipLoss (InfoNCE with
the learned temperature), backward, AdamW.  Both run in one process, interleaved step by step so that both see the
same machine load; the ratio of the medians is the figure of merit (`target`).  Prints a table and appends a row per
run to a CSV, with each kind's median page faults per step and the glibc malloc setting the process ran under.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fne_dist.bench.common import Timer, append_csv, print_table
from fne_dist.bench.buffer import fill
from fne_dist.config import KEYS, Config, DataSection, FNESection, ModelSection, TrainSection
from fne_dist.data.loader import Batch
from fne_dist.model import build_towers, param_groups
from fne_dist.distributed import init_distributed
from fne_dist.objectives import REGISTRY, objective_class
from fne_dist.train import Trainer
from fne_dist.weights import IMPLS

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is fne_dist/bench/step.py)
FIELDS = ("device", "model", "dtype", "batch", "queue", "buffer", "objective", "mode", "impl", "keys", "clock",
          "malloc", "clip_ms", "objective_ms", "ratio", "clip_faults", "objective_faults")


def target(objective: str, keys: str, device: str) -> float:
    """The step's target against CLIP's: with online keys 1.10 on a GPU and 1.15 on a CPU (issue 26); with momentum
    keys 1.35 for the sampled triplet (issue 10) and 1.15 for every other objective (issue 24)."""
    if keys == "online":
        return 1.15 if device == "cpu" else 1.10
    return 1.35 if objective == "fne" else 1.15


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "configs/models/tiny-vit.json"),
                        help="open_clip model name or model-config JSON (default: the demo's tiny ViT)")
    parser.add_argument("--objective", choices=tuple(REGISTRY), default="fne", help="fne.objective to time")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queue", type=int, default=8192)
    parser.add_argument("--mode", choices=("official", "bayes"), default="official")
    parser.add_argument("--impl", choices=IMPLS, default="auto", help="sampler (default: triton on CUDA, else torch)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--buffer", choices=("replicated", "sharded"), default="replicated",
                        help="buffer layout (one rank: sharded exercises the all-to-all path on itself)")
    parser.add_argument("--keys", choices=KEYS, default="momentum",
                        help="fne.keys: momentum towers, or the online features detached (no momentum forward)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall: elapsed time; process: this process's CPU time (CPU only: on a shared machine it "
                             "measures the work, not the share of the cores the process got)")
    parser.add_argument("--csv", default="runs/bench/step.csv", help="CSV to append the result row to")
    args = parser.parse_args(argv)
    if args.clock == "process" and torch.cuda.is_available():
        parser.error("--clock process counts CPU time, which misses the GPU's work: use --clock wall on a GPU")
    return args


def config(args, out_dir: str) -> Config:
    deepspeed = {"bf16": {"enabled": args.dtype == "bf16"},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True}}}
    return Config(model=ModelSection(name=args.model),
                  data=DataSection(train="(none: fne-bench step brings its own batch)", batch_size=args.batch),
                  fne=FNESection(objective=args.objective, queue_size=args.queue, mode=args.mode, impl=args.impl,
                                 buffer=args.buffer, keys=args.keys, warmup_epochs=0, queue_start_epoch=0),
                  train=TrainSection(output_dir=out_dir, eval_every=0, checkpoint_every=0),
                  deepspeed=deepspeed)


def clip_engine(args, cfg: Config, like: Trainer):
    """open_clip's CLIP model and loss in a DeepSpeed engine with the FNE trainer's settings."""
    import deepspeed
    from open_clip import ClipLoss

    torch.manual_seed(0)
    model = build_towers(cfg.model).model
    ds = {**cfg.deepspeed, "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
          "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
    loss_fn = ClipLoss()

    def step(batch: Batch) -> None:
        ia, ta, scale = engine(batch.images.to(like.dtype), batch.tokens)[:3]
        engine.backward(loss_fn(ia.float(), ta.float(), scale.float()))
        engine.step()

    return step


def run(args) -> dict:
    rt = init_distributed()
    device = rt.device
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = config(args, out_dir)
        trainer = Trainer(cfg, rt, batches_per_epoch=args.warmup + args.steps)
        fill(trainer.objective, trainer.towers.architecture["embed_dim"], device)
        clip_step = clip_engine(args, cfg, trainer)
        size = trainer.towers.model.visual.image_size
        size = size if isinstance(size, tuple) else (size, size)
        ids = torch.arange(args.batch, device=device)
        batch = Batch(torch.randn(args.batch, 3, *size, device=device),
                      trainer.towers.tokenizer([f"a photo of thing number {i}" for i in range(args.batch)]).to(device),
                      ids, torch.full_like(ids, -1))
        step = 0

        def objective_step():
            nonlocal step
            trainer.train_step(batch, step, warmup=False, epoch=0)
            step += 1

        timer = Timer(device, args.clock)
        for _ in range(args.warmup):
            timer(lambda: clip_step(batch))
            timer(objective_step)
        clip_ms, objective_ms, clip_faults, objective_faults = [], [], [], []
        for _ in range(args.steps):
            for times, faults, step_fn in ((clip_ms, clip_faults, lambda: clip_step(batch)),
                                           (objective_ms, objective_faults, objective_step)):
                before = minor_faults()
                times.append(timer(step_fn))
                faults.append(minor_faults() - before)
        trainer.metrics.close()
    clip, objective = statistics.median(clip_ms), statistics.median(objective_ms)
    name = Path(args.model).stem if args.model.endswith(".json") else args.model
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name,
            "dtype": args.dtype, "batch": args.batch, "queue": args.queue, "buffer": args.buffer,
            "objective": args.objective, "mode": args.mode, "impl": args.impl, "keys": keys_read(args),
            "clock": args.clock, "malloc": malloc_setting(), "clip_ms": round(clip, 2),
            "objective_ms": round(objective, 2), "ratio": round(objective / clip, 3),
            "clip_faults": statistics.median(clip_faults), "objective_faults": statistics.median(objective_faults)}


def minor_faults() -> int:
    """Page faults this process has taken (minor: a page mapped and zeroed, no disk read)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def malloc_setting() -> str:
    """glibc malloc's thresholds this process started with (`make test`, `demo` and `study` set them), or "default":
    they move a CPU step's time by a quarter (its page faults, the `*_faults` columns, medians per step), so each
    row says which it ran under."""
    given = [f"{name}={os.environ[var]}" for name, var in (("mmap", "MALLOC_MMAP_THRESHOLD_"),
                                                           ("trim", "MALLOC_TRIM_THRESHOLD_")) if var in os.environ]
    return ";".join(given) or "default"


def keys_read(args) -> str:
    """The keys the timed step used: `--keys`, or "none" for an objective that reads only ids (clip, vsepp), which
    runs no momentum towers whatever `--keys` says."""
    return args.keys if objective_class(args.objective).reads_keys else "none"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    row = run(args)
    print_table([row], FIELDS)
    goal = target(args.objective, row["keys"], row["device"])
    verdict = "within" if row["ratio"] <= goal else "ABOVE"
    print(f"{args.objective} step / CLIP step = {row['ratio']:.2f}x ({verdict} the {goal}x target, keys={row['keys']})")
    append_csv([row], FIELDS, args.csv)
