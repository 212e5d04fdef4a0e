"""Does FNE eliminate false negatives?  The objectives compared on the same frozen towers, budget and data order.

Each run trains only the two projection heads (image and text) over the frozen trunks' pooled features, which
are computed once and cached (`fne_dist.study.data`), so a run takes seconds on a CPU.  A run goes through the
library's own code in one process: `Objective` (with its `SimilarityStats`, `MomentumQueue`, `sample_negatives`
and losses), `momentum_update` for the momentum heads, and `retrieval_metrics`; it does not go through DeepSpeed
(one process, nothing to shard).

The protocol (`run_study`), so that no number on the test split chose anything:
  1. every set has train, validation and test splits by group (`fne_dist.study.data.study_splits`);
  2. each objective's settings grid (GRIDS) is tried on the first `select_seeds` seeds, trained on train and
     scored on validation; the point with the best mean (group-aware rsum where the metrics have it, else rsum)
     is chosen, and every point tried is recorded;
  3. the chosen setting runs with every seed; each run reads the test split once;
  4. runs of one seed share the initial heads and the data order, so each objective's difference from CLIP is
     paired by seed (mean and standard error over seeds).
"<name> oracle" is the same objective with fne.oracle (the true false negatives masked: an upper bound); "<name> @
<t> FN/row" runs it with the queue that holds t false negatives per anchor row of [batch ; queue] on average.

`python -m fne_dist.study` (what `make study` runs) builds the study's sets (or reads `--shards DIR`: anyone's
shards with a group label per pair), caches the features, runs the protocol and writes runs/study/
(`fne_dist.study.report`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fne_dist.config import KEYS, FNESection
from fne_dist.model import clamp_logit_scale
from fne_dist.momentum import momentum_update
from fne_dist.objective import Objective, momentum_keys
from fne_dist.objectives import objective_class
from fne_dist.objectives.diagnostics import DIAGNOSTICS, summarise
from fne_dist.retrieval import retrieval_metrics
from fne_dist.study.data import (CACHE_FILE, DATASETS, Split, false_negative_density, load_features,
                                 shard_features)
from fne_dist.study.report import ORACLE, SWEEP, settings_text, write_report

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
    # CLIP + memory: CLIP unchanged plus InfoNCE against the queue, XBM-style (posterior off) and with FNE's posterior
    "CLIP + memory": dict(objective="clip_queue", prior_ratio=1e30),
    "CLIP + memory, posterior": dict(objective="clip_queue"),
    "CLIP + memory, calibrated": dict(objective="clip_queue", neg_fit="all", prior_fit=True),
    "posterior soft targets": dict(objective="soft_clip"),
    "posterior soft targets, calibrated": dict(objective="soft_clip", neg_fit="all", prior_fit=True),
    # the same target share spread evenly (label smoothing): what a softer target gives without FNE's posterior
    "label smoothing (control)": dict(objective="soft_clip", soft_teacher="uniform"),
    "posterior InfoNCE, calibrated": dict(objective="posterior_infonce", neg_fit="all", prior_fit=True),
}
# name -> {setting: values tried on validation} (fne section fields, or "lr"); a variant not named has one point
PRIOR_RATIOS = (10.0, 100.0, 1000.0)
QUEUE_WEIGHTS = (0.1, 0.25, 0.5, 1.0)  # down to 0.1: where the memory hurts, validation can nearly switch it off
SOFT_ALPHAS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # to 1.0 (the posterior alone); 0.5, 0.7: docs/study/alpha-fine/
GRIDS = {**{name: {"prior_ratio": PRIOR_RATIOS}
            for name in ("FNE bayes", "FNE eliminate", "eliminate + (1-f) hinge", "posterior InfoNCE")},
         "CLIP + memory": {"queue_weight": QUEUE_WEIGHTS},
         "CLIP + memory, posterior": {"queue_weight": QUEUE_WEIGHTS, "prior_ratio": PRIOR_RATIOS},
         "CLIP + memory, calibrated": {"queue_weight": QUEUE_WEIGHTS},
         "posterior soft targets": {"soft_alpha": SOFT_ALPHAS, "prior_ratio": PRIOR_RATIOS},
         "posterior soft targets, calibrated": {"soft_alpha": SOFT_ALPHAS},
         "label smoothing (control)": {"soft_alpha": SOFT_ALPHAS}}
FN_PER_ROW = (0.1, 0.3, 1.0, 3.0, 10.0)  # the buffer sweep's targets: false negatives per anchor row
SWEPT = ("posterior InfoNCE", "CLIP + memory")  # what `python -m fne_dist.study` sweeps unless told


def sweep_name(name: str, fn_per_row: float) -> str:
    return f"{name}{SWEEP}{fn_per_row:g} FN/row"


def study_variants(names=tuple(VARIANTS), oracle: bool = True, sweep=(), fn_per_row=FN_PER_ROW) -> dict:
    """name -> (settings, grid): each named variant; with `oracle` also its twin "<name> oracle" (fne.oracle: the
    true false negatives masked); each variant in `sweep` (and its twin) at every target of false negatives per
    row, "<name> @ <t> FN/row" (the setting `fn_per_row` sizes the queue per set)."""
    out = {}
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}: use one of {tuple(VARIANTS)}")
        twins = ((name, {}), (name + ORACLE, {"oracle": True})) if oracle else ((name, {}),)
        for twin, extra in twins:
            out[twin] = ({**VARIANTS[name], **extra}, GRIDS.get(name, {}))
            if name in sweep:
                for t in fn_per_row:
                    out[sweep_name(twin, t)] = ({**out[twin][0], "fn_per_row": t}, out[twin][1])
    if missing := set(sweep) - set(names):
        raise ValueError(f"--sweep {sorted(missing)} must be among the variants run")
    return out


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values ([{}] for an empty grid)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


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

    def configure(self, settings: dict, train: Split) -> tuple[StudyBudget, FNESection]:
        """The budget and fne section of one configuration on a set: "lr" sets the budget's learning rate,
        "fn_per_row" the queue that holds that many false negatives per row of [batch ; queue] on `train`
        (`queue_for`); every other setting is an fne field."""
        settings = dict(settings)
        budget = replace(self, lr=settings.pop("lr", self.lr))
        if "fn_per_row" in settings:
            budget = replace(budget, queue_size=queue_for(settings.pop("fn_per_row"), train, self.batch_size))
        return budget, FNESection(**{**self.fne, "queue_size": budget.queue_size, "momentum": self.momentum,
                                     **settings})


def most_fn_per_row(train: Split) -> float:
    """The most false negatives per row that [batch ; queue] holds without a pair in it twice: the whole training
    split.  A longer queue would only repeat stale keys of the same pairs."""
    return false_negative_density(train) * (len(train.ids) - 1)


def queue_for(fn_per_row: float, train: Split, batch_size: int) -> int:
    """The queue size whose [batch ; queue] holds `fn_per_row` false negatives per anchor row on average (at
    least one global batch, which every step enqueues)."""
    density = false_negative_density(train)
    if density == 0:
        raise ValueError("the training split has no false negatives (no group holds two images): nothing to sweep")
    if fn_per_row > (most := most_fn_per_row(train)):
        raise ValueError(f"{fn_per_row:g} false negatives per row needs a queue longer than the training split "
                         f"({len(train.ids)} pairs), which holds at most {most:.2f}: sweep lower targets "
                         "(--fn-per-row)")
    return max(batch_size, math.ceil(fn_per_row / density) - batch_size)


def runnable(variants: dict, train: Split, batch_size: int, log) -> list[str]:
    """The variants a set can run: a sweep point beyond what its training split holds is left out, and so is one
    whose queue is an earlier point's of the same variant (both clamped to one batch: the same run twice); each
    is said."""
    most = most_fn_per_row(train) if any("fn_per_row" in s for s, _ in variants.values()) else 0.0
    out, queues = [], {}
    for name, (settings, _) in variants.items():
        target = settings.get("fn_per_row")
        if target is not None and target > most:
            log(f"{name}: left out, the training split holds at most {most:.2f} false negatives per row")
            continue
        if target is not None:
            base, queue = name.split(SWEEP)[0], queue_for(target, train, batch_size)
            if (base, queue) in queues:
                log(f"{name}: left out, its queue ({queue} keys) is {queues[base, queue]}'s on this set")
                continue
            queues[base, queue] = name
        out.append(name)
    return out


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
    diagnostics: dict  # summarise() over the steps after the warm-up epochs
    history: list  # per epoch: {"step", **summarise()} of that epoch's steps
    stats: tuple  # the fitted Gaussians at the end: (mean_pos, var_pos, mean_neg, var_neg)
    heads: Heads
    cfg: FNESection  # what it ran with
    settings: dict = field(default_factory=dict)  # its grid point (set by the study)
    metrics: dict = field(default_factory=dict)  # retrieval on the split it was scored on (validation or test)


def train_heads(train: Split, settings: dict, seed: int, budget: StudyBudget) -> RunResult:
    """One run on the training split: the same initial heads and data order for every variant with the same
    seed."""
    torch.manual_seed(seed)
    heads = Heads(train.image.shape[1], train.text.shape[1], budget.embed_dim)
    budget, cfg = budget.configure(settings, train)
    momentum_heads = copy.deepcopy(heads).requires_grad_(False) if momentum_keys(cfg) else None
    if not objective_class(cfg.objective).scaled:
        heads.logit_scale.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=budget.lr)
    objective = Objective(cfg, budget.embed_dim, torch.device("cpu"), seed)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train.ids) // budget.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(train.ids)} pairs, fewer than a batch of "
                         f"{budget.batch_size}: lower --batch-size")
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
            ik = tk = None  # no momentum keys: the objective takes the online features, detached
            if momentum_heads is not None:
                momentum_update(heads, momentum_heads, cfg.momentum)
                with torch.no_grad():
                    ik, tk, _ = momentum_heads(image, text)
            ia, ta, scale = heads(image, text)
            out = objective.loss(ia, ta, ik, tk, ids, groups, step=step, rank=0, warmup=warmup, logit_scale=scale,
                                 epoch=epoch)
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
    return RunResult(summarise(dict(zip(DIAGNOSTICS, after_warmup.tolist()))), history,
                     tuple(float(t) for t in objective.stats.moments()), heads, cfg)


@torch.no_grad()
def evaluate_heads(heads: Heads, split: Split) -> dict:
    """R@1/5/10 both ways and rsum on a split (every caption, every distinct image), exact and group-aware."""
    image_rows, text_to_image = split.eval_images()
    image_emb, text_emb, _ = heads(split.image[image_rows], split.text)
    return retrieval_metrics(image_emb, text_emb, text_to_image, groups=split.groups[image_rows])


def selection_metric(metrics: dict) -> str:
    """What validation chooses by: the group-aware rsum where the metrics have it, else rsum."""
    return "group_rsum" if "group_rsum" in metrics else "rsum"


def _run(task) -> tuple[tuple, RunResult, float]:
    """Train one configuration and score it on one split (validation in the grid, test once in the final runs)."""
    key, train, scored, settings, point, seed, budget = task
    torch.set_num_threads(1)  # runs of tiny matrices: threads only add overhead (10x slower on a loaded 2-core box)
    start = time.perf_counter()
    run = train_heads(train, {**settings, **point}, seed, budget)
    run.settings, run.metrics = point, evaluate_heads(run.heads, scored)
    return key, run, time.perf_counter() - start


@dataclass
class StudyResults:
    """runs: {dataset: {variant: [RunResult per seed, scored on test]}}; grid: one row per grid point and
    selection seed, scored on validation, `chosen` marking the point each variant then ran with."""

    runs: dict
    grid: list
    seeds: tuple
    select_seeds: int


def run_study(datasets: dict[str, dict[str, Split]], variants: dict, seeds=tuple(range(5)), select_seeds: int = 2,
              budget: StudyBudget | None = None, jobs: int = 1,
              log=functools.partial(print, flush=True)) -> StudyResults:
    """The protocol of the module docstring.  datasets: {name: {"train", "val", "test": Split}}; variants: name ->
    (settings, grid) (`study_variants`); `jobs` > 1 runs that many runs at once in worker processes."""
    if not 1 <= select_seeds <= len(seeds):
        raise ValueError(f"--select-seeds {select_seeds} must lie between 1 and the number of seeds ({len(seeds)})")
    budget = budget or StudyBudget()
    select = tuple(seeds[:select_seeds])
    points = {v: grid_points(grid) for v, (_, grid) in variants.items()}
    active = {name: runnable(variants, splits["train"], budget.batch_size,
                             lambda line, name=name: log(f"{name:12s} {line}"))
              for name, splits in datasets.items()}
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
            run_all = functools.partial(pool.map, _run)
        else:
            run_all = functools.partial(map, _run)

        def runs(tasks, split_name):
            done = {}
            for key, run, seconds in run_all(tasks):
                done[key] = run
                shares = "  ".join(f"{k} {run.diagnostics.get(k, float('nan')):.3f}" for k in (
                    "false_negative_share", "at_risk_false_negative_share", "false_negative_loss_share"))
                metric = selection_metric(run.metrics)
                log(f"{key[0]:12s} {key[1]:30s} {settings_text(run.settings):18s} seed {key[-1]}: {split_name} "
                    f"{metric} {run.metrics[metric]:6.1f}  {shares}  ({seconds:.1f} s)")
            return done

        # 2. every grid point on validation, the selection seeds only
        tried = runs([((name, v, n, seed), splits["train"], splits["val"], variants[v][0], point, seed, budget)
                      for name, splits in datasets.items() for v in active[name]
                      for n, point in enumerate(points[v]) for seed in select], "val")
        grid, chosen = [], {}
        for name in datasets:
            for v in active[name]:
                scores = [[tried[name, v, n, seed].metrics for seed in select] for n in range(len(points[v]))]
                metric = selection_metric(scores[0][0])
                chosen[name, v] = max(range(len(scores)), key=lambda n: (sum(m[metric] for m in scores[n]), -n))
                grid += [{"dataset": name, "objective": v, "settings": settings_text(points[v][n]), "seed": seed,
                          "selected_by": metric, "chosen": n == chosen[name, v], **m}
                         for n in range(len(scores)) for seed, m in zip(select, scores[n])]
        tried = {key: run for key, run in tried.items() if key[2] == chosen[key[:2]]}  # the other points' heads go
        # 3. the chosen point with every seed, each run scored on test once; the selection seeds' runs are reused
        fresh = runs([((name, v, seed), splits["train"], splits["test"], variants[v][0], points[v][chosen[name, v]],
                       seed, budget)
                      for name, splits in datasets.items() for v in active[name] for seed in seeds
                      if seed not in select],
                     "test")
    results = {}
    for name, splits in datasets.items():
        results[name] = {}
        for v in active[name]:
            results[name][v] = []
            for seed in seeds:
                if seed in select:
                    run = replace(tried[name, v, chosen[name, v], seed])
                    run.metrics = evaluate_heads(run.heads, splits["test"])
                else:
                    run = fresh[name, v, seed]
                results[name][v].append(run)
    return StudyResults(results, grid, tuple(seeds), len(select))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fne_dist.study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study", help="where the table, CSVs and plots go")
    parser.add_argument("--data", default="runs/study/data", help="shards and the feature cache")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--shards", nargs="+", metavar="DIR", type=Path,
                        help="instead of --datasets: shard folders of your own (fne-make-shards table ... "
                             "--label-column GROUP), each pair's label its group")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"objectives to compare (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--no-oracle", dest="oracle", action="store_false",
                        help="leave out each variant's oracle twin (the true false negatives masked)")
    parser.add_argument("--sweep", nargs="*", metavar="NAME", help="variants also run at the queue sizes of "
                        f"--fn-per-row (default: {', '.join(SWEPT)}, where among --variants)")
    parser.add_argument("--fn-per-row", nargs="+", type=float, default=list(FN_PER_ROW),
                        help="the sweep's false negatives per row of [batch ; queue] (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--select-seeds", type=int, default=2, help="seeds each grid point runs on validation "
                        "(the first ones; default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=StudyBudget.epochs)
    parser.add_argument("--batch-size", type=int, default=StudyBudget.batch_size)
    parser.add_argument("--keys", choices=KEYS, default="momentum",
                        help="the buffer's keys for every objective (fne.keys; default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        sweep = [name for name in SWEPT if name in args.variants] if args.sweep is None else args.sweep
        variants = study_variants(args.variants, args.oracle, sweep, args.fn_per_row)
        if args.shards:
            datasets = {d.name: shard_features(d, Path(args.data) / CACHE_FILE) for d in args.shards}
        else:
            datasets = {name: load_features(name, Path(args.data)) for name in args.datasets}
        defaults = StudyBudget()
        budget = replace(defaults, epochs=args.epochs, batch_size=args.batch_size,
                         fne={**defaults.fne, "keys": args.keys})
        results = run_study(datasets, variants, seeds=tuple(range(args.seeds)), select_seeds=args.select_seeds,
                            budget=budget, jobs=args.jobs)
    except ValueError as error:
        print(f"python -m fne_dist.study: error: {error}", file=sys.stderr)
        return 2
    write_report(results, datasets, budget, Path(args.out))
    return 0
