"""The study's outputs: the table (markdown + CSV: mean +- std over seeds, and each objective's difference from CLIP
paired by seed, +- its standard error), the grid tried on validation (grid.csv), per-run CSV, the sets' splits and
false-negative densities, and two plots per set (the fitted Gaussians over the measured similarity histograms;
the false-negative share against training step)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from fne_dist import objective
from fne_dist.stats import SimilarityStats
from fne_dist.study.data import false_negative_density
from fne_dist.weights import true_negative_prob

PAIRED = ("rsum", "group_rsum")  # the differences from the baseline that the table reports, where the metrics have them
SHARES = {"false_negative_share": "FN share of picks", "at_risk_false_negative_share": "FN share of at-risk picks",
          "false_negative_loss_share": "FN share of loss"}
LAST_EPOCH = {"at_risk_false_negative_share": "FN share of at-risk picks, last epoch"}
ROW_SHARES = {"fallback_share": "rows falling back", "no_negative_share": "rows without a negative"}  # sampled rows
GAUSSIAN_VARIANT = "FNE bayes"  # whose statistics and similarities the Gaussian plot shows (seed 0)
POSTERIOR_OFF = 1e20  # a prior ratio this large turns the posterior off (f = 0): nothing to score
BASELINE = "CLIP InfoNCE"
ORACLE = " oracle"  # the name of a variant run with fne.oracle
SWEEP = " @ "  # "<variant> @ <t> FN/row": a variant of the buffer sweep


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN where no run defines the value."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def metric_keys(results: dict) -> list[str]:
    """The retrieval metrics the runs report, in their order (whatever `retrieval_metrics` returns)."""
    first = next(run for variants in results.values() for runs in variants.values() for run in runs)
    return list(first.metrics)


def paired_difference(runs: list, baseline: list, key: str) -> tuple[float, float]:
    """Mean over seeds of run minus baseline run of the same seed, and its standard error (NaN for one seed)."""
    d = torch.tensor([r.metrics[key] - b.metrics[key] for r, b in zip(runs, baseline, strict=True)],
                     dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def summary_rows(results: dict) -> list[dict]:
    """One row per (dataset, variant): the chosen settings, mean and std over seeds of every metric and share, and
    the paired difference from BASELINE (where it ran) of PAIRED metrics with its standard error."""
    rows = []
    metrics = metric_keys(results)
    for dataset, variants in results.items():
        for variant, runs in variants.items():
            row = {"dataset": dataset, "objective": variant, "settings": settings_text(runs[0].settings),
                   "queue_size": runs[0].cfg.queue_size, "seeds": len(runs)}
            for key in metrics:
                row[key], row[f"{key}_std"] = mean_std([r.metrics[key] for r in runs])
            for key in PAIRED:
                if key in metrics and BASELINE in variants:
                    row[f"d_{key}"], row[f"d_{key}_se"] = paired_difference(runs, variants[BASELINE], key)
            for key in (*SHARES, *ROW_SHARES):
                row[key], row[f"{key}_std"] = mean_std([r.diagnostics.get(key, float("nan")) for r in runs])
            for key in LAST_EPOCH:
                row[f"last_{key}"], row[f"last_{key}_std"] = mean_std([r.history[-1].get(key, float("nan"))
                                                                        for r in runs])
            rows.append(row)
    return rows


def settings_text(settings: dict) -> str:
    """A grid point as `key=value ...` ("-" for none)."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()) or "-"


def _cell(mean: float, std: float, percent: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    scale = 100 if percent else 1
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


def markdown_table(rows: list[dict]) -> str:
    metrics = [k for k in rows[0] if f"{k}_std" in rows[0] and k not in SHARES and k not in ROW_SHARES
               and not k.startswith("last_")]
    paired = [k for k in PAIRED if f"d_{k}" in rows[0]]
    head = ["set", "objective", "settings", *metrics, *(f"Δ {k} vs CLIP" for k in paired), *SHARES.values(),
            *LAST_EPOCH.values(), *ROW_SHARES.values()]
    shares = (*SHARES, *(f"last_{k}" for k in LAST_EPOCH), *ROW_SHARES)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["dataset"], row["objective"], row["settings"], *(_cell(row[k], row[f"{k}_std"]) for k in metrics),
                 *(_cell(row[f"d_{k}"], row[f"d_{k}_se"]) for k in paired),
                 *(_cell(row[k], row[f"{k}_std"], percent=True) for k in shares)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plain_table(rows: list[dict]) -> str:
    """A markdown table of the rows as they are (floats to two decimals)."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def verdict_key(rows: list[dict]) -> str | None:
    """The paired difference the verdicts read: group-aware where measured, else the exact one (None: no baseline)."""
    return next((f"d_{k}" for k in reversed(PAIRED) if f"d_{k}" in rows[0]), None)


def best_oracle(rows: list[dict], dataset: str, key: str) -> dict | None:
    """The set's oracle row with the largest paired difference `key` (None where no oracle ran)."""
    oracles = [r for r in rows if r["dataset"] == dataset and ORACLE in r["objective"] and not math.isnan(r[key])]
    return max(oracles, key=lambda r: r[key], default=None)


def oracle_verdicts(rows: list[dict]) -> str:
    """Per set, whether eliminating false negatives can matter there: the best oracle's paired difference from
    CLIP (group-aware where measured) against twice its standard error."""
    key = verdict_key(rows)
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows) if key else ():
        best = best_oracle(rows, dataset, key)
        if best is None:
            continue
        gain = f"{best['objective']}: {best[key]:+.1f} ± {best[f'{key}_se']:.1f} {key[2:]}"
        lines.append(f"- {dataset}: elimination can matter ({gain} over CLIP, more than 2 SE)"
                     if best[key] > 2 * best[f"{key}_se"] else
                     f"- {dataset}: no oracle beats CLIP by more than 2 SE (best {gain}): eliminating false "
                     "negatives cannot help here")
    return "\n".join(lines) + "\n" if lines else ""


def uses_posterior(cfg) -> bool:
    """FNE's family: an objective that reads the posterior (`fne_dist.objective.uses_posterior`: not CLIP or VSE++, not
    hardness-only, not label smoothing), not an oracle, its posterior not switched off by a huge prior ratio."""
    return objective.uses_posterior(cfg) and not cfg.oracle and cfg.resolved_prior_ratio() < POSTERIOR_OFF


def family_verdicts(rows: list[dict], grid: list[dict], family: set) -> str:
    """Per set, the issue's targets for FNE's family (`family`: its (set, objective) pairs): the member with the best
    validation score (its chosen point, mean over the selection seeds: the test split chooses nothing), its paired
    difference from CLIP on test against 2 SE where an oracle beats CLIP by more than 2 SE (and the share of the
    best oracle's gain it recovers), else against -1 SE (FNE must not cost accuracy)."""
    key = verdict_key(rows)
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows) if key else ():
        chosen = [g for g in grid if g["dataset"] == dataset and g["chosen"] and (dataset, g["objective"]) in family]
        if not chosen:
            continue
        val = {}
        for g in chosen:
            val.setdefault(g["objective"], []).append(g[g["selected_by"]])
        best = max(val, key=lambda v: sum(val[v]) / len(val[v]))
        row = next(r for r in rows if r["dataset"] == dataset and r["objective"] == best)
        gain, se = row[key], row[f"{key}_se"]
        bound = best_oracle(rows, dataset, key)
        said = f"{best} (best of FNE's family on validation): {gain:+.1f} ± {se:.1f} {key[2:]} over CLIP on test"
        if bound is not None and bound[key] > 2 * bound[f"{key}_se"]:
            share = gain / bound[key]
            met = gain > 2 * se and share >= 0.5
            lines.append(f"- {dataset}: {said}, {share:.0%} of the best oracle's {bound[key]:+.1f} "
                         f"({bound['objective']}): target {'met' if met else 'missed'} (> 2 SE and at least half)")
        else:
            why = "no oracle run here" if bound is None else "no oracle beats CLIP by 2 SE here"
            lines.append(f"- {dataset}: {said}: target {'met' if gain >= -se else 'missed'} ({why}; no worse than "
                         "CLIP by more than 1 SE)")
    return "\n".join(lines) + "\n" if lines else ""


def density_rows(datasets: dict, budget) -> list[dict]:
    """Per set: pairs and groups per split, and the training split's false negatives per row in a batch and in
    [batch ; queue] at the budget's queue."""
    rows = []
    for name, splits in datasets.items():
        density = false_negative_density(splits["train"])
        rows.append({"dataset": name, **{f"{s}_pairs": len(split.ids) for s, split in splits.items()},
                     **{f"{s}_groups": len(split.groups.unique()) for s, split in splits.items()},
                     "fn_per_row_batch": density * (budget.batch_size - 1),
                     "fn_per_row_buffer": density * (budget.batch_size + budget.queue_size - 1)})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_rows(results: dict, seeds) -> list[dict]:
    """Every run: dataset, objective, seed, its settings and queue size, metrics on test, shares."""
    return [{"dataset": dataset, "objective": variant, "seed": seed, "settings": settings_text(run.settings),
             "queue_size": run.cfg.queue_size, **run.metrics,
             **{k: run.diagnostics.get(k, float("nan")) for k in (*SHARES, *ROW_SHARES)}}
            for dataset, variants in results.items() for variant, runs in variants.items()
            for seed, run in zip(seeds, runs, strict=True)]


@torch.no_grad()
def measured_similarities(run, split, batch_size: int) -> dict[str, torch.Tensor]:
    """What the statistics measure, over the training split in batches (FNE_SPEC step 6): positives of mutually
    top-1 rows and their hardest in-batch negatives, the latter split by the group into true and false negatives."""
    image, text, _ = run.heads(split.image, split.text)
    pos, true_neg, false_neg = [], [], []
    for start in range(0, len(split.ids) - batch_size + 1, batch_size):
        rows = slice(start, start + batch_size)
        s = image[rows] @ text[rows].T
        ids, groups = split.ids[rows], split.groups[rows]
        r = torch.arange(len(ids))
        mutual = (s.argmax(1) == r) & (s.argmax(0) == r)
        masked = s.masked_fill(ids[:, None] == ids[None, :], float("-inf"))
        pos.append(s.diagonal()[mutual])
        for values, cols in (masked.max(1), masked.max(0)):
            is_false = (groups[cols] == groups) & mutual
            false_neg.append(values[is_false])
            true_neg.append(values[~is_false & mutual])
    return {"positives": torch.cat(pos), "true negatives": torch.cat(true_neg),
            "false negatives": torch.cat(false_neg)}


@torch.no_grad()
def posterior_separation(run, split, rule) -> dict:
    """How the end-of-run posterior (the run's fitted Gaussians, its rule's prior ratio) scores every image-caption
    pair of the training split: false negatives (same group, another image) against true negatives."""
    image, text, _ = run.heads(split.image, split.text)
    sims = image @ text.T
    same_group = split.groups[:, None] == split.groups[None, :]
    false_neg = same_group & (split.ids[:, None] != split.ids[None, :])
    mean_pos, var_pos, mean_neg, var_neg = run.stats
    stats = SimilarityStats.from_moments(count_pos=rule.min_count + 1, mean_pos=mean_pos, var_pos=var_pos,
                                         mean_neg=mean_neg, var_neg=var_neg)
    f = 1 - true_negative_prob(sims, stats, rule)
    f_false, f_true = f[false_neg], f[~same_group]
    # AUC of f: P(f of a false negative > f of a true negative), ties counting one half
    sorted_true = f_true.sort().values
    below = torch.searchsorted(sorted_true, f_false).double()
    ties = torch.searchsorted(sorted_true, f_false, right=True).double() - below
    auc = float((below + ties / 2).mean() / len(f_true)) if len(f_false) and len(f_true) else float("nan")
    return {"prior_ratio": rule.prior_ratio, "positive_sim": float(sims.diagonal().mean()),
            "false_negative_sim": float(sims[false_neg].mean()), "true_negative_sim": float(sims[~same_group].mean()),
            "mean_f_false_negatives": float(f_false.mean()), "mean_f_true_negatives": float(f_true.mean()),
            "false_negatives_f_over_half": float((f_false >= 0.5).float().mean()),
            "true_negatives_f_over_half": float((f_true >= 0.5).float().mean()), "auc_f": float(auc)}


def plot_gaussians(path: Path, dataset: str, run, split, batch_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = measured_similarities(run, split, batch_size)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(-0.4, 1.0, 71).tolist()
    for (label, values), color in zip(sims.items(), ("tab:green", "tab:blue", "tab:red")):
        ax.hist(values.tolist(), bins=bins, density=True, alpha=0.45, color=color, label=f"{label} ({len(values)})")
    mean_pos, var_pos, mean_neg, var_neg = run.stats
    x = torch.linspace(-0.4, 1.0, 400)
    for mean, var, color, label in ((mean_pos, var_pos, "darkgreen", "fitted positive"),
                                    (mean_neg, var_neg, "darkblue", "fitted negative")):
        density = torch.exp(-(x - mean) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)
        ax.plot(x.tolist(), density.tolist(), color=color, label=f"{label} N({mean:.2f}, {math.sqrt(var):.2f}²)")
    ax.set_xlabel("cosine similarity (trained heads, training split)")
    ax.set_ylabel("density")
    ax.set_title(f"{dataset}: {GAUSSIAN_VARIANT}, seed 0\nnegatives: hardest in-batch of mutually top-1 rows",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shares(path: Path, dataset: str, variants: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHARES), figsize=(5 * len(SHARES), 4.5), sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, (key, title) in zip(axes, SHARES.items()):
        for n, (variant, runs) in enumerate(variants.items()):
            steps = [h["step"] for h in runs[0].history]
            curve = [mean_std([r.history[e].get(key, float("nan")) for r in runs])[0] for e in range(len(steps))]
            ax.plot(steps, [100 * v for v in curve], label=variant, color=colors(n))  # NaN: nothing drawn
        ax.set_title(f"{dataset}: {title}\n(per epoch, mean over seeds)", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("%")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: Path, dataset: str, rows: list[dict]) -> None:
    """The buffer sweep: each swept variant's paired difference from CLIP (+- SE) against the false negatives per
    row of its [batch ; queue]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = verdict_key(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["objective"].split(SWEEP)[0] for r in rows):
        points = sorted((r["fn_per_row"], r[key], r[f"{key}_se"]) for r in rows
                        if r["objective"].startswith(name + SWEEP))
        ax.errorbar(*zip(*points), marker="o", capsize=3, label=name)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("false negatives per row of [batch ; queue] (training split)")
    ax.set_ylabel(f"Δ {key[2:]} vs CLIP (paired, ± SE)")
    ax.set_title(f"{dataset}: buffer sweep", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(study, datasets: dict, budget, out: Path) -> list[dict]:
    """table.md (the protocol, the sets, the table), table.csv, runs.csv, grid.csv, sets.csv, posterior.csv (seed
    0 of each variant), history.json and the plots under `out`; returns the summary rows."""
    out.mkdir(parents=True, exist_ok=True)
    results = study.runs
    rows = summary_rows(results)
    sets = density_rows(datasets, budget)
    header = (f"Splits by group; settings chosen on validation from grid.csv ({study.select_seeds} seeds each), by "
              f"{study.grid[0]['selected_by']}; then {len(study.seeds)} seeds per objective, test read once per run; "
              f"Δ: paired by seed against {BASELINE}, ± standard error (other columns ± std).\n\n"
              + plain_table(sets) + "\n")
    family = {(d, v) for d, variants in results.items() for v, runs in variants.items() if uses_posterior(runs[0].cfg)}
    (out / "table.md").write_text(header + markdown_table(rows) + "\n" + oracle_verdicts(rows) + "\n"
                                  + family_verdicts(rows, study.grid, family))
    write_csv(out / "table.csv", rows)
    write_csv(out / "runs.csv", run_rows(results, study.seeds))
    write_csv(out / "grid.csv", study.grid)
    write_csv(out / "sets.csv", sets)
    history = {d: {v: [r.history for r in runs] for v, runs in vs.items()} for d, vs in results.items()}
    (out / "history.json").write_text(json.dumps({"budget": asdict(budget), "history": history}, indent=1))
    posterior = [{"dataset": dataset, "objective": variant,
                  **posterior_separation(runs[0], datasets[dataset]["train"], runs[0].cfg.rule())}
                 for dataset, variants in results.items() for variant, runs in variants.items()
                 if runs[0].cfg.resolved_prior_ratio() < POSTERIOR_OFF]
    if posterior:
        write_csv(out / "posterior.csv", posterior)
    for dataset, variants in results.items():
        plot_shares(out / f"fn_share_{dataset}.png", dataset, variants)
        per_row = false_negative_density(datasets[dataset]["train"])
        swept = [dict(r, fn_per_row=per_row * (budget.batch_size + r["queue_size"] - 1)) for r in rows
                 if r["dataset"] == dataset and SWEEP in r["objective"]]
        if swept:
            plot_sweep(out / f"sweep_{dataset}.png", dataset, swept)
        if GAUSSIAN_VARIANT in variants:
            plot_gaussians(out / f"gaussians_{dataset}.png", dataset, variants[GAUSSIAN_VARIANT][0],
                           datasets[dataset]["train"], budget.batch_size)
    return rows
