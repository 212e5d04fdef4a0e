"""The study's outputs: the table (markdown + CSV, mean +- std over seeds), per-run CSV, and two plots per set
(the fitted Gaussians over the measured similarity histograms; the false-negative share against training step)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from fne_dist.retrieval import COLUMNS, GROUP_COLUMNS
from fne_dist.stats import SimilarityStats
from fne_dist.weights import true_negative_prob

METRICS = COLUMNS + GROUP_COLUMNS  # exact, then group-aware (a hit: any item of the query's group)
SHARES = {"false_negative_share": "FN share of picks", "at_risk_false_negative_share": "FN share of at-risk picks",
          "false_negative_loss_share": "FN share of loss"}
LAST_EPOCH = {"at_risk_false_negative_share": "FN share of at-risk picks, last epoch"}
ROW_SHARES = {"fallback_share": "rows falling back", "no_negative_share": "rows without a negative"}  # sampled rows
GAUSSIAN_VARIANT = "FNE bayes"
POSTERIOR_OFF = 1e20  # a prior ratio this large turns the posterior off (f = 0): nothing to score  # whose statistics and similarities the Gaussian plot shows (seed 0)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN where no run defines the value."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def summary_rows(results: dict) -> list[dict]:
    """One row per (dataset, variant): mean and std over seeds of every metric and share."""
    rows = []
    for dataset, variants in results.items():
        for variant, runs in variants.items():
            row = {"dataset": dataset, "objective": variant, "seeds": len(runs)}
            for key in METRICS:
                row[key], row[f"{key}_std"] = mean_std([r.metrics[key] for r in runs])
            for key in (*SHARES, *ROW_SHARES):
                row[key], row[f"{key}_std"] = mean_std([r.diagnostics.get(key, float("nan")) for r in runs])
            for key in LAST_EPOCH:
                row[f"last_{key}"], row[f"last_{key}_std"] = mean_std([r.history[-1].get(key, float("nan"))
                                                                        for r in runs])
            rows.append(row)
    return rows


def _cell(mean: float, std: float, percent: bool = False) -> str:
    if math.isnan(mean):
        return "—"
    scale = 100 if percent else 1
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


def markdown_table(rows: list[dict]) -> str:
    head = ["set", "objective", *METRICS, *SHARES.values(), *LAST_EPOCH.values(), *ROW_SHARES.values()]
    shares = (*SHARES, *(f"last_{k}" for k in LAST_EPOCH), *ROW_SHARES)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["dataset"], row["objective"], *(_cell(row[k], row[f"{k}_std"]) for k in METRICS),
                 *(_cell(row[k], row[f"{k}_std"], percent=True) for k in shares)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_rows(results: dict) -> list[dict]:
    """Every run: dataset, objective, seed, metrics, shares."""
    return [{"dataset": dataset, "objective": variant, "seed": seed, **run.metrics,
             **{k: run.diagnostics.get(k, float("nan")) for k in (*SHARES, *ROW_SHARES)}}
            for dataset, variants in results.items() for variant, runs in variants.items()
            for seed, run in enumerate(runs)]


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


def write_report(results: dict, datasets: dict, budget, out: Path, header: str = "") -> list[dict]:
    """table.md, table.csv, runs.csv, posterior.csv (seed 0 of each variant), history.json and the plots under
    `out`; returns the summary rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    (out / "table.md").write_text(header + markdown_table(rows))
    write_csv(out / "table.csv", rows)
    write_csv(out / "runs.csv", run_rows(results))
    history = {d: {v: [r.history for r in runs] for v, runs in vs.items()} for d, vs in results.items()}
    (out / "history.json").write_text(json.dumps({"budget": asdict(budget), "history": history}, indent=1))
    posterior = [{"dataset": dataset, "objective": variant,
                  **posterior_separation(runs[0], datasets[dataset][0], budget.section(variant).rule())}
                 for dataset, variants in results.items() for variant, runs in variants.items()
                 if budget.section(variant).resolved_prior_ratio() < POSTERIOR_OFF]
    write_csv(out / "posterior.csv", posterior)
    for dataset, variants in results.items():
        plot_shares(out / f"fn_share_{dataset}.png", dataset, variants)
        if GAUSSIAN_VARIANT in variants:
            plot_gaussians(out / f"gaussians_{dataset}.png", dataset, variants[GAUSSIAN_VARIANT][0],
                           datasets[dataset][0], budget.batch_size)
    return rows
