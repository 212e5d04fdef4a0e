"""`python -m fne_dist.demo` (what `make demo` runs): FNE against CLIP and VSE++ on real handwritten digits, on 2 CPU
ranks.

1. builds the digit shards (scikit-learn's bundled scans; several captions per image; class labels kept so that
   false negatives can be counted),
2. trains four variants on the same budget with `configs/demo.yaml`, each as 2 gloo ranks under torchrun with
   DeepSpeed: CLIP's in-batch InfoNCE (open_clip's ClipLoss) and VSE++ hardest negatives for every epoch (the
   baselines), FNE with the released code's rule, and FNE with the Bayes rule,
3. prints one table (and writes it with every metric to runs.csv): recall both ways, rsum, the group-aware rsum
   (a hit: any image or caption of the query's digit class), and in the last epoch the share of the negatives
   each variant trained on that were false negatives (same digit class, another image; CLIP picks none) and the
   false negatives' share of what pushes negatives away (hinge values; CLIP: softmax mass),
4. draws the positive and hardest-negative similarity distributions of the FNE model on the test images with the
   two Gaussians FNE fitted during training (PNG).

From random weights the VSE++ warm-up epoch that the released code runs before FNE (it starts from pretrained
towers) collapses the tiny model's embedding, so the demo config starts FNE at once (warmup_epochs=0).
Extra key=value arguments override the config of all four runs (e.g. train.epochs=2 for a quick look).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fne_dist import checkpoint, metrics_log
from fne_dist.config import from_dict, load_config
from fne_dist.data.loader import load_eval_set
from fne_dist.data.digits import build_demo_shards
from fne_dist.distributed import free_port
from fne_dist.evaluate import embed
from fne_dist.model import build_towers
from fne_dist.retrieval import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
SHARES = {"FN share": "false_negative_share", "FN loss share": "false_negative_loss_share"}


def variants(epochs: int) -> list[tuple[str, str, list[str]]]:
    """(name, run folder, overrides): the same budget, only the objective differs."""
    return [("CLIP InfoNCE", "clip", ["fne.objective=clip"]),
            ("VSE++ (hardest negative)", "vsepp", ["fne.mode=official", f"fne.warmup_epochs={epochs}"]),
            ("FNE official", "fne-official", ["fne.mode=official"]),
            ("FNE bayes", "fne-bayes", ["fne.mode=bayes"])]


def train_variant(out_dir: Path, overrides: list[str]) -> None:
    """Train one variant from scratch (each `make demo` replaces the previous demo's runs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "fne_dist.train", "--config", str(CONFIG), f"train.output_dir={out_dir}", "--overwrite", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


def _share(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}%"


def table(rows: dict[str, dict]) -> str:
    header = ["variant", *COLUMNS, "group_rsum", *SHARES]
    lines = [[name, *(f"{r['eval'][c]:.2f}" for c in (*COLUMNS, "group_rsum")),
              *(_share(r[key]) for key in SHARES.values())] for name, r in rows.items()]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in [header, *lines])


def plot_similarities(run_dir: Path, png: Path) -> None:
    """Histogram of positive and hardest-negative test similarities with the Gaussians fitted in training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tag = checkpoint.locate(run_dir)
    cfg = from_dict(checkpoint.read_state(tag)["config"])
    towers = build_towers(cfg.model)
    towers.model.load_state_dict(checkpoint.online_state_dict(tag))
    eval_set = load_eval_set(cfg.data.val, preprocess=towers.preprocess_val, tokenizer=towers.tokenizer)
    images, texts = embed(towers.model.float(), eval_set, torch.device("cpu"))
    sims = texts @ images.T  # [T, I]
    owner = eval_set.text_to_image
    positive = sims.gather(1, owner[:, None]).squeeze(1)
    hardest = sims.scatter(1, owner[:, None], float("-inf")).max(1).values
    logged = [r for r in metrics_log.read(run_dir / "metrics.jsonl", "train") if "mean_pos" in r]

    fig, ax = plt.subplots(figsize=(7, 4))
    low = min(positive.min().item(), hardest.min().item()) - 0.05
    high = min(1.0, max(positive.max().item(), hardest.max().item()) + 0.05)
    bins = np.linspace(low, high, 61)
    ax.hist(positive.numpy(), bins=bins, density=True, alpha=0.5, color="tab:green", label="positive pairs")
    ax.hist(hardest.numpy(), bins=bins, density=True, alpha=0.5, color="tab:red", label="hardest negative per caption")
    s = np.linspace(low, high, 400)
    title = f"{run_dir.name}: test similarities (no Gaussians were logged: a run shorter than train.log_every)"
    if logged:  # the last logged fit: the checkpoint's statistics may have just been reset for a new epoch
        fitted = logged[-1]
        for kind, color in (("pos", "darkgreen"), ("neg", "darkred")):
            mean, var = fitted[f"mean_{kind}"], fitted[f"var_{kind}"]
            density = np.exp(-(s - mean) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)
            ax.plot(s, density, color=color, label=f"fitted N({mean:.2f}, {np.sqrt(var):.2f}²) [{kind}]")
        title = f"{run_dir.name}: similarities and the Gaussians FNE fitted (step {fitted['step']})"
    ax.set_xlabel("cosine similarity (test set)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fne_dist.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for shards, runs, table and plot")
    parser.add_argument("overrides", nargs="*", help="config overrides for all four runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    start = time.time()
    out = Path(args.out).resolve()
    shards = out / "shards"
    manifest = build_demo_shards(shards)
    data = [f"data.{key}={shards}/{manifest['splits'][split]['pattern']}" for key, split in (("train", "train"),
                                                                                             ("val", "test"))]
    epochs = load_config(CONFIG, args.overrides).train.epochs

    rows = {}
    for name, folder, overrides in variants(epochs):
        run_dir = out / folder
        print(f"\n=== {name}: {run_dir}", flush=True)
        train_variant(run_dir, [*data, *overrides, *args.overrides])
        summary = json.loads((run_dir / "summary.json").read_text())
        last = summary["epochs"][-1]
        rows[name] = {"eval": summary["eval"], **{key: last.get(key, float("nan")) for key in SHARES.values()},
                      "dir": run_dir, "checkpoint": summary["checkpoint"]}

    png = out / "similarities.png"
    plot_similarities(rows["FNE bayes"]["dir"], png)
    report = table(rows)
    (out / "table.txt").write_text(report + "\n")
    with (out / "runs.csv").open("w", newline="") as f:
        fields = ["variant", *rows["FNE bayes"]["eval"], *SHARES.values()]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({"variant": name, **r["eval"], **{k: r[k] for k in SHARES.values()}}
                         for name, r in rows.items())
    test = manifest["splits"]["test"]
    print(f"\nTest split: {test['samples']} digit images, {test['pairs']} captions; {epochs} epochs each, "
          "2 CPU ranks (DeepSpeed, gloo).")
    print("group_rsum: rsum where a hit is any image or caption of the query's digit class.")
    print("FN share: of the negatives each variant trained on in its last epoch, those showing the anchor's digit")
    print("class in another image (VSE++: the hardest in-batch negative; FNE: the sampled negative; CLIP picks none).")
    print("FN loss share: the false negatives' share of what pushes negatives away (hinge values; CLIP: softmax "
          "mass).\n")
    print(report)
    official, bayes = rows["FNE official"], rows["FNE bayes"]
    if official["eval"] == bayes["eval"]:
        print("\nFNE official and bayes drew the same negatives: the rules differ only through the false-negative "
              "posterior f, which is off until\nmin_count positives were counted in an epoch and, with fitted "
              "Gaussians this close (see the plot), barely varies between\ncandidates, so the exponential race "
              "picks the same ones.")
    print(f"\ncheckpoints: {', '.join(str(r['checkpoint']) for r in rows.values())}")
    print(f"plot: {png}\ntable: {out / 'table.txt'}, {out / 'runs.csv'}\ntotal {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
