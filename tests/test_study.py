"""The study's code on a tiny run (synthetic features, seconds): runs, the table (mean +- std over seeds), the CSVs
and the plots; the same seed gives the same run, and every variant of a seed sees the same data order."""
import csv
import math
from dataclasses import replace

import pytest
import torch

from fne_dist.study.data import Split
from fne_dist.study.run import VARIANTS, StudyBudget, run_study, train_heads
from fne_dist.study.report import METRICS, SHARES, markdown_table, summary_rows, write_report

TINY = StudyBudget(embed_dim=16, batch_size=32, epochs=3, queue_size=64)


def synthetic(n_groups: int, per_group: int, seed: int) -> Split:
    """Groups of images that share one caption (as identical titles do): within a group, false negatives."""
    g = torch.Generator().manual_seed(seed)
    concept = torch.randn(n_groups, 8, generator=g)
    groups = torch.arange(n_groups).repeat_interleave(per_group)
    image_map = torch.randn(8, 24, generator=torch.Generator().manual_seed(100))
    text_map = torch.randn(8, 12, generator=torch.Generator().manual_seed(101))
    image = (concept[groups] + 0.3 * torch.randn(len(groups), 8, generator=g)) @ image_map
    text = concept[groups] @ text_map + 0.1 * torch.randn(len(groups), 12, generator=g)
    return Split(image, text, torch.arange(len(groups)) + 1000 * seed, groups)


@pytest.fixture(scope="module")
def data():
    return {"tiny": (synthetic(40, 3, 0), synthetic(20, 2, 1))}


@pytest.fixture(scope="module")
def results(data):
    return run_study(data, seeds=(0, 1), variants=("FNE eliminate", "posterior InfoNCE"), budget=TINY,
                     log=lambda line: None)


def test_table_is_mean_and_std_over_seeds(results):
    rows = summary_rows(results)
    assert [(r["dataset"], r["objective"], r["seeds"]) for r in rows] == [
        ("tiny", "FNE eliminate", 2), ("tiny", "posterior InfoNCE", 2)]
    for row, runs in zip(rows, results["tiny"].values()):
        rsums = torch.tensor([run.metrics["rsum"] for run in runs], dtype=torch.float64)
        assert math.isclose(row["rsum"], rsums.mean().item()) and math.isclose(row["rsum_std"], rsums.std().item())
        assert 0 <= row["false_negative_loss_share"] <= 1
    # picks exist only where negatives are sampled: the InfoNCE row has no pick share
    assert 0 <= rows[0]["false_negative_share"] <= 1 and math.isnan(rows[1]["false_negative_share"])
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "| tiny | posterior InfoNCE |" in table and "—" in table


def test_report_files(results, data, tmp_path):
    write_report(results, data, TINY, tmp_path)
    with (tmp_path / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and all(k in table[0] for k in (*METRICS, *SHARES))
    with (tmp_path / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["objective"], r["seed"]) for r in runs] == [
        ("FNE eliminate", "0"), ("FNE eliminate", "1"), ("posterior InfoNCE", "0"), ("posterior InfoNCE", "1")]
    assert (tmp_path / "fn_share_tiny.png").stat().st_size > 0
    assert (tmp_path / "table.md").read_text().startswith("| set | objective |")


def test_gaussian_plot_and_history(data, tmp_path):
    results = run_study(data, seeds=(0,), variants=("FNE bayes",), budget=TINY, log=lambda line: None)
    write_report(results, data, TINY, tmp_path)
    assert (tmp_path / "gaussians_tiny.png").stat().st_size > 0
    run = results["tiny"]["FNE bayes"][0]
    assert [h["step"] for h in run.history] == [3, 6, 9] and run.history[0]["warmup"]
    mean_pos, var_pos, mean_neg, var_neg = run.stats
    assert var_pos > 0 and var_neg > 0 and mean_pos > mean_neg


def test_same_seed_same_run_and_every_variant_sees_the_same_data(data, monkeypatch):
    train, test = data["tiny"]
    first = train_heads(train, test, "FNE official", 0, TINY)
    again = train_heads(train, test, "FNE official", 0, TINY)
    assert first.metrics == again.metrics and first.history == again.history
    seen = {}
    import fne_dist.study.run as study

    real = study.Objective.loss

    def spy(self, ia, ta, ik, tk, ids, labels, **kw):
        seen.setdefault(self.cfg.objective, []).append(ids.clone())
        return real(self, ia, ta, ik, tk, ids, labels, **kw)

    monkeypatch.setattr(study.Objective, "loss", spy)
    for variant in ("CLIP InfoNCE", "VSE++"):
        train_heads(train, test, variant, 1, replace(TINY, epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(seen["clip"], seen["vsepp"]))
    assert set(VARIANTS) >= {"CLIP InfoNCE", "VSE++"}


def test_posterior_separation_scores_false_negatives(results, data):
    from fne_dist.study.report import posterior_separation

    run = results["tiny"]["FNE eliminate"][0]
    got = posterior_separation(run, data["tiny"][0], TINY.section("FNE eliminate").rule())
    assert got["prior_ratio"] == 100.0 and 0 <= got["auc_f"] <= 1
    assert 0 <= got["mean_f_true_negatives"] <= 1 and 0 <= got["false_negatives_f_over_half"] <= 1


def test_feature_cache_computes_each_content_once(tmp_path):
    from fne_dist.study.data import FeatureCache

    calls = []

    def reference(x):
        return x.float().sum(1, keepdim=True).repeat(1, 3)

    def compute(x):
        calls.append(len(x))
        return reference(x)

    rows = torch.arange(24).reshape(8, 3)
    cache = FeatureCache(tmp_path / "f.pt", "towers A")
    first, computed = cache.get("image", rows[[0, 1, 1, 2]], compute)
    assert computed == 3 and torch.equal(first, reference(rows[[0, 1, 1, 2]]))
    cache.save()
    again = FeatureCache(tmp_path / "f.pt", "towers A")
    # the same images in other sets or orders are read back; only the new row is computed
    features, computed = again.get("image", rows[[2, 5, 0]], compute)
    assert computed == 1 and calls == [3, 1] and torch.equal(features, reference(rows[[2, 5, 0]]))
    assert again.get("text", rows[:2], compute)[1] == 2  # texts are cached apart from images
    assert FeatureCache(tmp_path / "f.pt", "towers B").get("image", rows[:1], compute)[1] == 1  # other towers


def test_false_negatives_per_row_against_every_draw():
    """The expected count over every set of `size` other pairs, by enumeration: pairs 0 and 1 share an image (not
    a false negative of each other), groups {0, 1, 2} and {3, 4}, pair 5 alone."""
    from itertools import combinations

    from fne_dist.study.data import false_negatives_per_row

    ids, groups = torch.tensor([7, 7, 8, 9, 10, 11]), torch.tensor([0, 0, 0, 1, 1, 2])
    split = Split(torch.zeros(6, 1), torch.zeros(6, 1), ids, groups)
    for size in (1, 2, 3, 5):
        counts = [sum(int(groups[j] == groups[i] and ids[j] != ids[i]) for j in draw)
                  for i in range(6) for draw in combinations([j for j in range(6) if j != i], size)]
        assert false_negatives_per_row(split, size) == pytest.approx(sum(counts) / len(counts))
    assert false_negatives_per_row(split, 100) == false_negatives_per_row(split, 5) == pytest.approx(6 / 6)
