"""`fne-bench step`: what an FNE training step costs next to a plain CLIP step, on the same model and batch.

The CLIP step is open_clip's recipe: forward both towers, ClipLoss (InfoNCE with the learned temperature),
backward, AdamW.  The FNE step adds what FNE needs: the momentum (EMA) update, the momentum towers' forward,
the statistics, sampling one negative per anchor and direction from [batch ; full queue] with the Bayes rule on,
the triplet loss and the enqueue (`fne_dist.objective.Objective`, the trainer's own code).  Both run in one
process, interleaved step by step so that both see the same machine load; the ratio of the medians is the figure
of merit (target <= 1.4).  Prints a table and appends a row per run to a CSV.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fne_dist.config import FNESection, ModelSection
from fne_dist.model import build_towers, encode, freeze_temperature, momentum_copy, momentum_update, param_groups
from fne_dist.objective import Objective
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("device", "model", "dtype", "batch", "queue", "mode", "impl", "clip_ms", "fne_ms", "ratio")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "configs/models/tiny-vit.json"),
                        help="open_clip model name or model-config JSON (default: the demo's tiny ViT)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queue", type=int, default=8192)
    parser.add_argument("--mode", choices=("official", "bayes"), default="official")
    parser.add_argument("--impl", default="auto", help="sampler: auto | dense | torch | triton")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", default="runs/bench/step.csv", help="CSV to append the result row to")
    return parser.parse_args(argv)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn) -> float:
        """Milliseconds of fn(), the device drained before and after."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1000 * (time.perf_counter() - start)


def filled_objective(args, dim: int, device: torch.device) -> Objective:
    """An Objective whose queue is full and whose statistics already switch the Bayes rule on (the steady state)."""
    objective = Objective(FNESection(queue_size=args.queue, mode=args.mode, impl=args.impl), dim, device, seed=0)
    g = torch.Generator(device="cpu").manual_seed(0)
    keys = [F.normalize(torch.randn(args.queue, dim, generator=g), dim=1).to(device) for _ in range(2)]
    ids = torch.arange(args.queue, device=device) + 10**9  # never equal to the batch's ids
    objective.enqueue(GlobalKeys(*keys, ids, torch.full_like(ids, -1)))
    objective.stats = SimilarityStats.from_moments(count_pos=10_000, mean_pos=0.6, var_pos=0.01, mean_neg=0.3,
                                                   var_neg=0.02, reset="never", device=device)
    return objective


def run(args) -> dict:
    from open_clip import ClipLoss

    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    torch.manual_seed(0)
    towers = build_towers(ModelSection(name=args.model))
    clip_model = towers.model.to(device)
    fne_model = copy.deepcopy(clip_model)
    freeze_temperature(fne_model)
    momentum = momentum_copy(fne_model)
    clip_opt = torch.optim.AdamW(param_groups(clip_model, 0.1), lr=1e-4)
    fne_opt = torch.optim.AdamW(param_groups(fne_model, 0.1), lr=1e-4)
    objective = filled_objective(args, towers.architecture["embed_dim"], device)
    clip_loss = ClipLoss()

    size = clip_model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(args.batch, 3, *size, device=device)
    tokens = towers.tokenizer([f"a photo of thing number {i}" for i in range(args.batch)]).to(device)
    ids = torch.arange(args.batch, device=device)
    labels = torch.full_like(ids, -1)

    def clip_step():
        with autocast:
            ia, ta, scale = clip_model(images, tokens)[:3]
            loss = clip_loss(ia, ta, scale)
        loss.backward()
        clip_opt.step()
        clip_opt.zero_grad(set_to_none=True)

    step = 0

    def fne_step():
        nonlocal step
        with autocast:
            ia, ta, _ = encode(fne_model, images, tokens)
            momentum_update(fne_model, momentum, 0.995)
            with torch.no_grad():
                ik, tk, _ = encode(momentum, images, tokens)
            out = objective.loss(ia, ta, ik, tk, ids, labels, step=step, rank=0, warmup=False)
        out.loss.backward()
        fne_opt.step()
        fne_opt.zero_grad(set_to_none=True)
        objective.enqueue(out.keys)
        step += 1

    timer = Timer(device)
    for _ in range(args.warmup):
        timer(clip_step)
        timer(fne_step)
    clip_ms, fne_ms = [], []
    for _ in range(args.steps):
        clip_ms.append(timer(clip_step))
        fne_ms.append(timer(fne_step))
    clip, fne = statistics.median(clip_ms), statistics.median(fne_ms)
    name = Path(args.model).stem if args.model.endswith(".json") else args.model
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name,
            "dtype": dtype, "batch": args.batch, "queue": args.queue, "mode": args.mode, "impl": args.impl,
            "clip_ms": round(clip, 2), "fne_ms": round(fne, 2), "ratio": round(fne / clip, 3)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    row = run(args)
    widths = {k: max(len(k), len(str(row[k]))) for k in FIELDS}
    print("  ".join(k.ljust(widths[k]) for k in FIELDS))
    print("  ".join(str(row[k]).ljust(widths[k]) for k in FIELDS))
    verdict = "within" if row["ratio"] <= 1.4 else "ABOVE"
    print(f"FNE step / CLIP step = {row['ratio']:.2f}x ({verdict} the 1.4x target)")
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"appended to {path}")
