"""Does FNE eliminate false negatives?  The objectives compared on the same frozen towers, budget and data order.

Each run trains only the two projection heads (image and text) over the frozen trunks' pooled features, which
are computed once and cached (`fne_dist.study.data`), so a run takes seconds on a CPU.  A run goes through the
library's own code in one process: `Objective` (with its `SimilarityStats`, `MomentumQueue`, `sample_negatives`
and losses), `momentum_update` for the momentum heads, and `retrieval_metrics` on the held-out split; it does not
go through DeepSpeed (one process, nothing to shard).

`python -m fne_dist.study` (what `make study` runs) builds the data, caches the features, trains every variant
with every seed on both sets and writes runs/study/ (`fne_dist.study.report`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fne_dist.config import FNESection
from fne_dist.model import clamp_logit_scale
from fne_dist.momentum import momentum_update
from fne_dist.objective import Objective
from fne_dist.objectives import objective_class
from fne_dist.objectives.diagnostics import DIAGNOSTICS, summarise
from fne_dist.retrieval import retrieval_metrics
from fne_dist.study.data import DATASETS, Split, load_features
from fne_dist.study.report import write_report

# name -> the fne section's objective settings; everything else is StudyBudget's and shared by all
VARIANTS = {
    "CLIP InfoNCE": dict(objective="clip"),
    "VSE++": dict(objective="vsepp"),
    "hardness-only": dict(objective="fne", mode="hardness"),
    "FNE official": dict(objective="fne", mode="official"),
    "FNE bayes": dict(objective="fne", mode="bayes"),
    "FNE eliminate": dict(objective="fne", mode="eliminate"),
    "eliminate + (1-f) hinge": dict(objective="fne", mode="eliminate", posterior_hinge=True),
    "posterior InfoNCE": dict(objective="posterior_infonce"),
    # the same loss with the posterior off (a false negative's prior ~0, so 1 - f = 1): what the posterior adds
    "buffer InfoNCE (posterior off)": dict(objective="posterior_infonce", prior_ratio=1e30),
}


@dataclass
class StudyBudget:
    """What every run of the study shares (not tuned on the test split; see the README)."""

    embed_dim: int = 256
    batch_size: int = 128
    epochs: int = 15
    lr: float = 1e-3
    queue_size: int = 2048
    momentum: float = 0.99  # the released 0.995 lags a run of a few hundred steps
    fne: dict = field(default_factory=lambda: dict(stats_reset="ema", ema_decay=0.95, impl="torch"))

    def section(self, variant: str) -> FNESection:
        return FNESection(**{**self.fne, "queue_size": self.queue_size, "momentum": self.momentum,
                             **VARIANTS[variant]})


class Heads(nn.Module):
    """The trained part: linear projections of the frozen trunks' pooled features, and CLIP's logit scale."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int):
        super().__init__()
        self.image = nn.Linear(image_dim, embed_dim, bias=False)
        self.text = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # open_clip's initial temperature

    def forward(self, image, text):
        return F.normalize(self.image(image), dim=1), F.normalize(self.text(text), dim=1), self.logit_scale.exp()


@dataclass
class RunResult:
    metrics: dict  # retrieval on the test split
    diagnostics: dict  # summarise() over the steps after the warm-up epochs
    history: list  # per epoch: {"step", **summarise()} of that epoch's steps
    stats: tuple  # the fitted Gaussians at the end: (mean_pos, var_pos, mean_neg, var_neg)
    heads: Heads


def train_heads(train: Split, test: Split, variant: str, seed: int, budget: StudyBudget) -> RunResult:
    """One run: the same initial heads and data order for every variant with the same seed."""
    torch.manual_seed(seed)
    heads = Heads(train.image.shape[1], train.text.shape[1], budget.embed_dim)
    momentum_heads = copy.deepcopy(heads).requires_grad_(False)
    cfg = budget.section(variant)
    if not objective_class(cfg.objective).scaled:
        heads.logit_scale.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=budget.lr)
    objective = Objective(cfg, budget.embed_dim, torch.device("cpu"), seed)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train.ids) // budget.batch_size
    after_warmup = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64)
    history = []
    step = 0
    for epoch in range(budget.epochs):
        warmup = epoch < cfg.warmup_epochs
        perm = torch.randperm(len(train.ids), generator=order)
        epoch_sums = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64)
        for b in range(steps_per_epoch):
            rows = perm[b * budget.batch_size:(b + 1) * budget.batch_size]
            image, text, ids, groups = train.image[rows], train.text[rows], train.ids[rows], train.groups[rows]
            momentum_update(heads, momentum_heads, cfg.momentum)
            with torch.no_grad():
                ik, tk, _ = momentum_heads(image, text)
            ia, ta, scale = heads(image, text)
            out = objective.loss(ia, ta, ik, tk, ids, groups, step=step, rank=0, warmup=warmup, logit_scale=scale)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            clamp_logit_scale(heads)
            objective.commit(out)
            epoch_sums += out.diagnostics
            step += 1
        objective.stats.new_epoch()
        history.append({"step": step, "warmup": warmup, **summarise(dict(zip(DIAGNOSTICS, epoch_sums.tolist())))})
        if epoch >= 1:  # the same steps for every variant, whatever its warm-up
            after_warmup += epoch_sums
    return RunResult(evaluate_heads(heads, test), summarise(dict(zip(DIAGNOSTICS, after_warmup.tolist()))),
                     history, tuple(float(t) for t in objective.stats.moments()), heads)


@torch.no_grad()
def evaluate_heads(heads: Heads, split: Split) -> dict:
    """R@1/5/10 both ways and rsum on a split (every caption, every distinct image), exact and group-aware."""
    image_rows, text_to_image = split.eval_images()
    image_emb, text_emb, _ = heads(split.image[image_rows], split.text)
    return retrieval_metrics(image_emb, text_emb, text_to_image, groups=split.groups[image_rows])


def _run(task) -> tuple[str, str, int, RunResult, float]:
    name, train, test, variant, seed, budget = task
    torch.set_num_threads(1)  # runs of tiny matrices: threads only add overhead (10x slower on a loaded 2-core box)
    start = time.perf_counter()
    return name, variant, seed, train_heads(train, test, variant, seed, budget), time.perf_counter() - start


def run_study(datasets: dict[str, tuple[Split, Split]], seeds=(0, 1, 2), variants=tuple(VARIANTS),
              budget: StudyBudget | None = None, jobs: int = 1, log=functools.partial(print, flush=True)) -> dict:
    """{dataset: {variant: [RunResult per seed]}}; `jobs` > 1 runs that many runs at once in worker processes."""
    budget = budget or StudyBudget()
    tasks = [(name, train, test, variant, seed, budget) for name, (train, test) in datasets.items()
             for variant in variants for seed in seeds]
    done = {}
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
            finished = pool.map(_run, tasks)
        else:
            finished = map(_run, tasks)
        for name, variant, seed, run, seconds in finished:
            done[name, variant, seed] = run
            shares = "  ".join(f"{key} {run.diagnostics.get(key, float('nan')):.3f}" for key in (
                "false_negative_share", "at_risk_false_negative_share", "false_negative_loss_share"))
            log(f"{name:12s} {variant:26s} seed {seed}: rsum {run.metrics['rsum']:6.1f}  group rsum "
                f"{run.metrics['group_rsum']:6.1f}  {shares}  ({seconds:.1f} s)")
    return {name: {variant: [done[name, variant, seed] for seed in seeds] for variant in variants}
            for name in datasets}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fne_dist.study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study", help="where the table, CSVs and plots go")
    parser.add_argument("--data", default="runs/study/data", help="shards and the feature cache")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=StudyBudget.epochs)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default: %(default)s)")
    args = parser.parse_args(argv)
    features = {name: load_features(name, Path(args.data)) for name in args.datasets}
    datasets = {name: (splits["train"], splits["test"]) for name, splits in features.items()}
    budget = replace(StudyBudget(), epochs=args.epochs)
    results = run_study(datasets, seeds=tuple(range(args.seeds)), budget=budget, jobs=args.jobs)
    write_report(results, datasets, budget, Path(args.out))

