"""The study's code on a tiny run (synthetic features, seconds): the protocol (splits by group, settings chosen on
validation with the grid recorded, test read once per run, paired differences from CLIP), the oracle and buffer
sweep variants, the table (mean +- std over seeds), the CSVs and the plots; the same seed gives the same run, and
every variant of a seed sees the same data order.  The last test runs `python -m fne_dist.study --shards` end to end
on shards made by `fne-make-shards table`."""
import csv
import math
from dataclasses import replace

import pytest
import torch

from fne_dist.study import run as study
from fne_dist.study.data import Split, false_negative_density, split_by_group, study_splits
from fne_dist.config import FNESection
from fne_dist.study.report import (SHARES, family_verdicts, markdown_table, oracle_verdicts, summary_rows,
                                    uses_posterior, write_report)
from fne_dist.study.run import (VARIANTS, StudyBudget, grid_points, most_fn_per_row, queue_for, run_study, runnable,
                                study_variants, sweep_name, train_heads)

TINY = StudyBudget(embed_dim=16, batch_size=32, epochs=3, queue_size=64)
QUIET = dict(log=lambda line: None)


def synthetic(n_groups: int, per_group: int, seed: int) -> Split:
    """Groups of images that share one caption (as identical titles do): within a group, false negatives."""
    g = torch.Generator().manual_seed(seed)
    concept = torch.randn(n_groups, 8, generator=g)
    groups = torch.arange(n_groups).repeat_interleave(per_group) + 1000 * seed
    image_map = torch.randn(8, 24, generator=torch.Generator().manual_seed(100))
    text_map = torch.randn(8, 12, generator=torch.Generator().manual_seed(101))
    image = (concept[groups - 1000 * seed] + 0.3 * torch.randn(len(groups), 8, generator=g)) @ image_map
    text = concept[groups - 1000 * seed] @ text_map + 0.1 * torch.randn(len(groups), 12, generator=g)
    return Split(image, text, torch.arange(len(groups)) + 1000 * seed, groups)


@pytest.fixture(scope="module")
def data():
    return {"tiny": {"train": synthetic(40, 3, 0), "val": synthetic(12, 2, 2), "test": synthetic(20, 2, 1)}}


@pytest.fixture(scope="module")
def results(data):
    variants = study_variants(("CLIP InfoNCE", "FNE eliminate", "posterior InfoNCE"), oracle=False)
    variants["FNE eliminate"] = (variants["FNE eliminate"][0], {"prior_ratio": (10.0, 1000.0)})
    return run_study(data, variants, seeds=(0, 1, 2), select_seeds=2, budget=TINY, **QUIET)


def test_table_is_mean_and_std_over_seeds_and_paired_difference_from_clip(results):
    rows = summary_rows(results.runs)
    assert [(r["dataset"], r["objective"], r["seeds"]) for r in rows] == [
        ("tiny", "CLIP InfoNCE", 3), ("tiny", "FNE eliminate", 3), ("tiny", "posterior InfoNCE", 3)]
    clip = torch.tensor([run.metrics["rsum"] for run in results.runs["tiny"]["CLIP InfoNCE"]], dtype=torch.float64)
    for row, runs in zip(rows, results.runs["tiny"].values()):
        rsums = torch.tensor([run.metrics["rsum"] for run in runs], dtype=torch.float64)
        assert math.isclose(row["rsum"], rsums.mean().item()) and math.isclose(row["rsum_std"], rsums.std().item())
        d = rsums - clip
        assert math.isclose(row["d_rsum"], d.mean().item(), abs_tol=1e-9)
        assert math.isclose(row["d_rsum_se"], d.std().item() / math.sqrt(3), abs_tol=1e-9)
        assert 0 <= row["false_negative_loss_share"] <= 1
    assert rows[0]["d_rsum"] == 0 and rows[0]["d_rsum_se"] == 0
    # picks exist only where negatives are sampled: the InfoNCE row has no pick share
    assert 0 <= rows[1]["false_negative_share"] <= 1 and math.isnan(rows[2]["false_negative_share"])
    table = markdown_table(rows)
    assert table.count("\n") == 5 and "Δ rsum vs CLIP" in table
    assert "| tiny | posterior InfoNCE | prior_ratio=" in table


def test_settings_are_chosen_on_validation_and_every_point_is_recorded(results):
    grid = [r for r in results.grid if r["objective"] == "FNE eliminate"]
    assert [(r["settings"], r["seed"]) for r in grid] == [
        ("prior_ratio=10", 0), ("prior_ratio=10", 1), ("prior_ratio=1000", 0), ("prior_ratio=1000", 1)]
    # the study's splits carry groups: the choice is by the group-aware rsum
    mean = {s: sum(r["group_rsum"] for r in grid if r["settings"] == s) / 2
            for s in ("prior_ratio=10", "prior_ratio=1000")}
    best = max(mean, key=lambda s: (mean[s], s == "prior_ratio=10"))
    assert [r["settings"] for r in grid if r["chosen"]] == [best, best]
    assert all(r["selected_by"] == "group_rsum" for r in results.grid)
    runs = results.runs["tiny"]["FNE eliminate"]
    assert all(f"prior_ratio={run.cfg.prior_ratio:g}" == best for run in runs)
    # a grid of one point is still recorded, on validation
    assert [r["chosen"] for r in results.grid if r["objective"] == "CLIP InfoNCE"] == [True, True]


def test_the_test_split_is_read_once_per_run_and_chooses_nothing(data, monkeypatch):
    """Scrambling the test split's features changes no choice and no validation score; each (variant, seed) scores
    on test exactly once."""
    variants = study_variants(("FNE bayes", "VSE++"), oracle=False)
    variants["FNE bayes"] = (variants["FNE bayes"][0], {"prior_ratio": (10.0, 1000.0)})
    test = data["tiny"]["test"]
    scored = []
    real = study.evaluate_heads

    def spy(heads, split):
        scored.append(split.image.data_ptr())
        return real(heads, split)

    monkeypatch.setattr(study, "evaluate_heads", spy)
    budget = replace(TINY, epochs=2)
    first = run_study(data, variants, seeds=(0, 1, 2), select_seeds=2, budget=budget, **QUIET)
    assert scored.count(test.image.data_ptr()) == 2 * 3
    assert scored.count(data["tiny"]["val"].image.data_ptr()) == (2 + 1) * 2
    scrambled = replace(test, image=test.image.flip(0), text=-test.text)
    second = run_study({"tiny": {**data["tiny"], "test": scrambled}}, variants, seeds=(0, 1, 2), select_seeds=2,
                       budget=budget, **QUIET)
    assert first.grid == second.grid
    with pytest.raises(ValueError, match="--select-seeds 3 must lie between 1 and the number of seeds"):
        run_study(data, variants, seeds=(0, 1), select_seeds=3, budget=budget, **QUIET)
    assert [r.metrics for r in first.runs["tiny"]["VSE++"]] != [r.metrics for r in second.runs["tiny"]["VSE++"]]


def test_oracle_and_sweep_variants(data, tmp_path):
    variants = study_variants(("CLIP InfoNCE", "FNE bayes", "posterior InfoNCE"), sweep=("posterior InfoNCE",),
                              fn_per_row=(1.5, 4.0))
    assert list(variants) == [
        "CLIP InfoNCE", "CLIP InfoNCE oracle", "FNE bayes", "FNE bayes oracle", "posterior InfoNCE",
        sweep_name("posterior InfoNCE", 1.5), sweep_name("posterior InfoNCE", 4.0), "posterior InfoNCE oracle",
        "posterior InfoNCE oracle @ 1.5 FN/row", "posterior InfoNCE oracle @ 4 FN/row"]
    assert variants["FNE bayes oracle"] == ({**VARIANTS["FNE bayes"], "oracle": True}, study.GRIDS["FNE bayes"])
    with pytest.raises(ValueError, match="--sweep"):
        study_variants(("CLIP InfoNCE",), sweep=("posterior InfoNCE",))
    variants = {k: (v[0], {}) for k, v in variants.items() if "CLIP" in k or "bayes" in k or "FN/row" in k}
    said = []
    out = run_study(data, variants, seeds=(0, 1), select_seeds=1, budget=TINY, log=said.append)
    bayes = out.runs["tiny"]["FNE bayes oracle"]
    assert all(run.diagnostics["false_negative_share"] == 0 for run in bayes)  # the oracle never draws one
    assert sum(run.diagnostics["false_negative_share"] for run in out.runs["tiny"]["FNE bayes"]) > 0
    train = data["tiny"]["train"]
    swept = out.runs["tiny"][sweep_name("posterior InfoNCE", 1.5)][0]
    assert swept.cfg.queue_size == queue_for(1.5, train, TINY.batch_size) > TINY.batch_size
    # 4 per row needs more than the 120 training pairs (2 false negatives each): left out on this set, and said
    assert most_fn_per_row(train) < 4.0 and sweep_name("posterior InfoNCE", 4.0) not in out.runs["tiny"]
    assert any(line.startswith("tiny") and "posterior InfoNCE @ 4 FN/row: left out" in line for line in said)
    write_report(out, data, TINY, tmp_path)
    with (tmp_path / "runs.csv").open() as f:
        names = {r["objective"]: int(r["queue_size"]) for r in csv.DictReader(f)}
    assert "posterior InfoNCE oracle @ 1.5 FN/row" in names and names["CLIP InfoNCE oracle"] == TINY.queue_size
    assert (tmp_path / "sweep_tiny.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert "\n- tiny: " in table and "(best of FNE's family on validation)" in table


def test_oracle_verdict_says_where_elimination_can_matter():
    def row(dataset, objective, d, se):
        return {"dataset": dataset, "objective": objective, "d_rsum": d, "d_rsum_se": se}

    rows = [row("a", "CLIP InfoNCE", 0.0, 0.0), row("a", "CLIP InfoNCE oracle", 2.8, 0.2),
            row("a", "VSE++ oracle", -3.0, 1.0), row("b", "CLIP InfoNCE", 0.0, 0.0),
            row("b", "CLIP InfoNCE oracle", 0.15, 0.27), row("b", "posterior InfoNCE", 5.0, 0.1)]
    assert oracle_verdicts(rows) == (
        "- a: elimination can matter (CLIP InfoNCE oracle: +2.8 ± 0.2 rsum over CLIP, more than 2 SE)\n"
        "- b: no oracle beats CLIP by more than 2 SE (best CLIP InfoNCE oracle: +0.1 ± 0.3 rsum): eliminating false "
        "negatives cannot help here\n")


def test_family_verdict_picks_on_validation_and_holds_the_issues_targets():
    def row(dataset, objective, d, se):
        return {"dataset": dataset, "objective": objective, "d_group_rsum": d, "d_group_rsum_se": se}

    def val(dataset, objective, score, chosen=True):
        return [{"dataset": dataset, "objective": objective, "seed": seed, "selected_by": "group_rsum",
                 "chosen": chosen, "group_rsum": score} for seed in (0, 1)]

    rows = [row("a", "CLIP InfoNCE", 0.0, 0.0), row("a", "CLIP InfoNCE oracle", 4.0, 0.5),
            row("a", "soft", 2.5, 0.5), row("a", "memory", 9.0, 1.0),
            row("b", "CLIP InfoNCE", 0.0, 0.0), row("b", "CLIP InfoNCE oracle", 0.5, 0.4), row("b", "soft", -0.6, 0.5)]
    # "memory" scores best on test but worse on validation: validation chooses "soft"; an unchosen point counts not
    grid = (val("a", "soft", 300.0) + val("a", "memory", 290.0) + val("a", "memory", 400.0, chosen=False)
            + val("a", "CLIP InfoNCE", 350.0) + val("b", "soft", 100.0))
    family = {("a", "soft"), ("a", "memory"), ("b", "soft")}
    assert family_verdicts(rows, grid, family) == (
        "- a: soft (best of FNE's family on validation): +2.5 ± 0.5 group_rsum over CLIP on test, 62% of the best "
        "oracle's +4.0 (CLIP InfoNCE oracle): target met (> 2 SE and at least half)\n"
        "- b: soft (best of FNE's family on validation): -0.6 ± 0.5 group_rsum over CLIP on test: target missed (no "
        "oracle beats CLIP by 2 SE here; no worse than CLIP by more than 1 SE)\n")
    without_oracles = [r for r in rows if "oracle" not in r["objective"] and r["dataset"] == "b"]
    assert "(no oracle run here; no worse" in family_verdicts(without_oracles, grid, family)


def test_the_family_is_what_reads_the_posterior():
    def cfg(**kw):
        return FNESection(**kw)

    assert [uses_posterior(cfg(**VARIANTS[v])) for v in ("CLIP InfoNCE", "VSE++", "hardness-only", "FNE official",
                                                        "FNE bayes", "buffer InfoNCE (posterior off)", "CLIP + memory",
                                                        "CLIP + memory, posterior", "posterior soft targets",
                                                        "label smoothing (control)")] == [
        False, False, False, True, True, False, False, True, True, False]
    assert not uses_posterior(cfg(**VARIANTS["posterior soft targets"], oracle=True))


def test_false_negative_density_and_the_sweeps_queue_size():
    split = synthetic(10, 4, 0)
    split = replace(split, ids=split.ids // 2)  # every image in two pairs of its group: same id, no false negative
    same_group = split.groups[:, None] == split.groups[None, :]
    false_neg = same_group & (split.ids[:, None] != split.ids[None, :])
    want = (false_neg.sum(1).double() / (len(split.ids) - 1)).mean().item()
    assert math.isclose(false_negative_density(split), want)
    most = want * (len(split.ids) - 1)  # the whole split in [batch ; queue]
    assert math.isclose(most_fn_per_row(split), most)
    for target in (0.8, 1.3, most):
        q = queue_for(target, split, 8)
        assert (q + 8 - 1) * want <= target <= (q + 8) * want
    with pytest.raises(ValueError, match="needs a queue longer than the training split"):
        queue_for(most * 1.01, split, 8)
    assert queue_for(0.01, split, 8) == 8  # never below a batch
    budget, cfg = replace(TINY, batch_size=8).configure({"objective": "clip", "lr": 3e-3, "fn_per_row": 1.3}, split)
    assert (budget.lr, budget.queue_size, cfg.queue_size, cfg.objective) == (3e-3, queue_for(1.3, split, 8),
                                                                              budget.queue_size, "clip")
    with pytest.raises(ValueError, match="no false negatives"):
        queue_for(1.0, synthetic(10, 1, 0), 8)


def test_sweep_points_of_one_queue_run_once():
    """Two targets that clamp to the same queue (one batch) are one run: the second is left out, and said."""
    split = synthetic(10, 4, 0)
    low = [t for t in (0.01, 0.02) if queue_for(t, split, 8) == 8]
    assert len(low) == 2
    variants = study_variants(("posterior InfoNCE",), oracle=False, sweep=("posterior InfoNCE",),
                              fn_per_row=(*low, 2.0))
    said = []
    kept = runnable(variants, split, 8, said.append)
    assert queue_for(2.0, split, 8) > 8
    assert kept == ["posterior InfoNCE", sweep_name("posterior InfoNCE", 0.01), sweep_name("posterior InfoNCE", 2.0)]
    assert said == [f"{sweep_name('posterior InfoNCE', 0.02)}: left out, its queue (8 keys) is "
                    f"{sweep_name('posterior InfoNCE', 0.01)}'s on this set"]


def test_splits_by_group():
    one = synthetic(50, 3, 0)
    splits = study_splits({"train": one}, "somewhere")
    assert [len(s.ids) for s in splits.values()] == [105, 15, 30]  # 35 / 5 / 10 groups
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(splits[a].groups.tolist()) & set(splits[b].groups.tolist())
    assert torch.equal(study_splits({"train": one}, "again")["val"].ids, splits["val"].ids)  # a fixed seed
    carved = study_splits({"train": one, "test": synthetic(5, 2, 1)}, "somewhere")
    assert len(carved["val"].ids) == 15 and torch.equal(carved["test"].ids, synthetic(5, 2, 1).ids)
    rest, part = split_by_group(one, 0.1, 0)
    assert torch.equal(torch.sort(torch.cat([rest.ids, part.ids])).values, one.ids)
    own = {"train": one, "val": synthetic(2, 2, 2), "test": synthetic(2, 2, 1)}
    assert study_splits(own, "x") == own
    unlabelled = replace(one, groups=torch.where(one.ids < 3, -1, one.groups))
    with pytest.raises(ValueError, match="3 pairs have no group label.*--label-column"):
        study_splits({"train": unlabelled}, "x")


def test_report_files(results, data, tmp_path):
    write_report(results, data, TINY, tmp_path)
    with (tmp_path / "table.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and all(k in table[0] for k in ("rsum", "d_rsum", "d_rsum_se", *SHARES))
    with (tmp_path / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert [(r["objective"], r["seed"]) for r in runs][:4] == [
        ("CLIP InfoNCE", "0"), ("CLIP InfoNCE", "1"), ("CLIP InfoNCE", "2"), ("FNE eliminate", "0")]
    with (tmp_path / "grid.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(results.grid) == 2 * (1 + 2 + 3)  # seeds x points
    with (tmp_path / "sets.csv").open() as f:
        (sets,) = list(csv.DictReader(f))
    assert sets["train_pairs"] == "120" and sets["val_groups"] == "12"
    assert math.isclose(float(sets["fn_per_row_batch"]), false_negative_density(data["tiny"]["train"]) * 31)
    assert (tmp_path / "fn_share_tiny.png").stat().st_size > 0
    assert (tmp_path / "table.md").read_text().startswith("Splits by group; settings chosen on validation")


def test_gaussian_plot_and_history(data, tmp_path):
    out = run_study(data, study_variants(("FNE bayes",), oracle=False), seeds=(0,), select_seeds=1,
                    budget=replace(TINY), **QUIET)
    write_report(out, data, TINY, tmp_path)
    assert (tmp_path / "gaussians_tiny.png").stat().st_size > 0
    run = out.runs["tiny"]["FNE bayes"][0]
    assert [h["step"] for h in run.history] == [3, 6, 9] and run.history[0]["warmup"]
    mean_pos, var_pos, mean_neg, var_neg = run.stats
    assert var_pos > 0 and var_neg > 0 and mean_pos > mean_neg


def test_same_seed_same_run_and_every_variant_sees_the_same_data(data, monkeypatch):
    train = data["tiny"]["train"]
    first = train_heads(train, VARIANTS["FNE official"], 0, TINY)
    again = train_heads(train, VARIANTS["FNE official"], 0, TINY)
    assert first.history == again.history and first.stats == again.stats
    assert all(torch.equal(a, b) for a, b in zip(first.heads.parameters(), again.heads.parameters()))
    seen = {}
    real = study.Objective.loss

    def spy(self, ia, ta, ik, tk, ids, labels, **kw):
        seen.setdefault(self.cfg.objective, []).append(ids.clone())
        return real(self, ia, ta, ik, tk, ids, labels, **kw)

    monkeypatch.setattr(study.Objective, "loss", spy)
    for variant in ("CLIP InfoNCE", "VSE++"):
        train_heads(train, VARIANTS[variant], 1, replace(TINY, epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(seen["clip"], seen["vsepp"]))
    assert grid_points({}) == [{}] and len(grid_points({"a": (1, 2), "b": (3, 4, 5)})) == 6


def test_online_keys_run_without_momentum_heads(data, monkeypatch):
    """fne.keys=online in the study's budget: no momentum heads are moved or run, and every step hands the objective
    no keys (it takes the online features, detached); the run trains and is evaluated."""
    import fne_dist.study.run as study

    def forbidden(*args):
        raise AssertionError("the momentum heads were updated")

    keys, real = [], study.Objective.loss

    def spy(self, ia, ta, ik, tk, ids, labels, **kw):
        keys.append((ik, tk, self.cfg.keys))
        return real(self, ia, ta, ik, tk, ids, labels, **kw)

    monkeypatch.setattr(study, "momentum_update", forbidden)
    monkeypatch.setattr(study.Objective, "loss", spy)
    run = train_heads(data["tiny"]["train"], {**VARIANTS["FNE bayes"], "keys": "online"}, 0, TINY)
    assert len(keys) == 3 * 3 and all(k == (None, None, "online") for k in keys)  # 3 epochs of 3 steps
    metrics = study.evaluate_heads(run.heads, data["tiny"]["test"])
    assert math.isfinite(metrics["rsum"]) and run.history[-1]["mean_survivors"] > 0


def test_posterior_separation_scores_false_negatives(results, data):
    from fne_dist.study.report import posterior_separation

    run = results.runs["tiny"]["FNE eliminate"][0]
    got = posterior_separation(run, data["tiny"]["train"], run.cfg.rule())
    assert got["prior_ratio"] == run.cfg.prior_ratio and 0 <= got["auc_f"] <= 1
    assert 0 <= got["mean_f_true_negatives"] <= 1 and 0 <= got["false_negatives_f_over_half"] <= 1


def drawn_shards(tmp_path):
    """Shards that `fne-make-shards table --label-column` makes from a CSV of 36 drawn images (12 groups of
    paraphrased captions)."""
    import pandas as pd
    from PIL import Image, ImageDraw

    from fne_dist.data.make_shards import main as make_shards

    colors, shapes = ("red", "green", "blue", "orange"), ("circle", "square", "triangle")
    templates = ("a drawing of a {}", "{} clip art", "a {}, vector illustration")
    rows = []
    for g, (color, shape) in enumerate((c, s) for c in colors for s in shapes):
        for k, template in enumerate(templates):
            image = Image.new("RGB", (64, 64), "white")
            box = (8 + 4 * k, 8 + 2 * k, 52 - 2 * k, 56 - 3 * k)
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse(box, fill=color)
            elif shape == "square":
                draw.rectangle(box, fill=color)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
            path = tmp_path / "img" / f"{g}-{k}.png"
            path.parent.mkdir(exist_ok=True)
            image.save(path)
            rows.append({"filepath": f"img/{g}-{k}.png", "title": template.format(f"{color} {shape}"), "group": g})
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    shards = tmp_path / "mine"
    assert make_shards(["table", str(tmp_path / "pairs.csv"), "--label-column", "group", "--out", str(shards),
                        "--workers", "1", "--quiet"]) == 0
    return shards


def test_study_on_anyones_shards_end_to_end(tmp_path, capsys):
    """`python -m fne_dist.study --shards DIR` on `drawn_shards`: the pretrained towers' features, the three splits
    by group, the protocol, and every output file; a folder that is no shard folder is one error line."""
    shards = drawn_shards(tmp_path)
    out = tmp_path / "out"
    argv = ["--shards", str(shards), "--data", str(tmp_path / "cache"), "--out", str(out), "--seeds", "2",
            "--select-seeds", "1", "--epochs", "2", "--batch-size", "8", "--jobs", "1",
            "--variants", "CLIP InfoNCE", "FNE bayes", "posterior InfoNCE", "--fn-per-row", "1"]
    assert study.main(argv) == 0
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert {r["dataset"] for r in runs} == {"mine"} and len(runs) == 2 * 8  # 3 variants + 3 oracles + 2 swept
    assert {"FNE bayes oracle", "posterior InfoNCE oracle @ 1 FN/row"} <= {r["objective"] for r in runs}
    with (out / "sets.csv").open() as f:
        (sets,) = list(csv.DictReader(f))
    assert (sets["train_groups"], sets["val_groups"], sets["test_groups"]) == ("9", "1", "2")  # 20%, 10% of 12
    assert (sets["train_pairs"], sets["test_pairs"]) == ("27", "6")
    assert {p.name for p in out.iterdir()} >= {"table.md", "table.csv", "grid.csv", "posterior.csv", "history.json",
                                                "fn_share_mine.png", "gaussians_mine.png"}
    assert "| mine | FNE bayes oracle |" in (out / "table.md").read_text()
    capsys.readouterr()
    assert study.main(["--shards", str(tmp_path / "img"), "--variants", "VSE++"]) == 2  # nothing swept by default
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m fne_dist.study: error:") and "no manifest.json" in err[0]


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
    digests, computed = cache.add("image", rows[[0, 1, 1, 2]], compute)
    assert computed == 3 and torch.equal(cache.lookup("image", digests), reference(rows[[0, 1, 1, 2]]))
    cache.save()
    again = FeatureCache(tmp_path / "f.pt", "towers A")
    # the same images in other sets or orders are read back; only the new row is computed
    digests, computed = again.add("image", rows[[2, 5, 0]], compute)
    assert computed == 1 and calls == [3, 1] and torch.equal(again.lookup("image", digests), reference(rows[[2, 5, 0]]))
    assert again.add("text", rows[:2], compute)[1] == 2  # texts are cached apart from images
    assert FeatureCache(tmp_path / "f.pt", "towers B").add("image", rows[:1], compute)[1] == 1  # other towers


def test_unchanged_shards_are_read_from_the_feature_cache_without_decoding(tmp_path, monkeypatch):
    """The cache indexes the shards it has read by their bytes: read again, they give the same splits with no image
    decoded and no tower built; a cache without that index (an older file) decodes once, computes nothing, and
    keeps the index."""
    import fne_dist.model
    from fne_dist.data.shards import read_manifest
    from fne_dist.study import data

    shards, cache_file = drawn_shards(tmp_path), tmp_path / "cache.pt"
    first = data.shard_features(shards, cache_file, log=lambda line: None)
    with monkeypatch.context() as m:
        for module, name in ((data, "load_eval_set"), (fne_dist.model, "build_towers")):
            m.setattr(module, name, lambda *a, **k: pytest.fail("unchanged shards were decoded"))
        lines = []
        again = data.shard_features(shards, cache_file, log=lines.append)
    assert "computed 0 image and 0 caption features" in lines[0]
    for split in first:
        for field in ("image", "text", "ids", "groups"):
            assert torch.equal(getattr(first[split], field), getattr(again[split], field)), (split, field)
    stored = torch.load(cache_file, weights_only=True)
    assert len(stored.pop("shards")) == len(read_manifest(shards)["splits"])  # an index for each split's shards
    torch.save(stored, cache_file)
    lines = []
    data.shard_features(shards, cache_file, log=lines.append)
    assert "computed 0 image and 0 caption features" in lines[0] and torch.load(cache_file, weights_only=True)["shards"]


def test_false_negative_density_against_every_draw():
    """Density x n is the expected count of false negatives among n other pairs drawn uniformly, by enumeration:
    pairs 0 and 1 share an image (not a false negative of each other), groups {0, 1, 2} and {3, 4}, pair 5 alone."""
    from itertools import combinations

    ids, groups = torch.tensor([7, 7, 8, 9, 10, 11]), torch.tensor([0, 0, 0, 1, 1, 2])
    split = Split(torch.zeros(6, 1), torch.zeros(6, 1), ids, groups)
    for size in (1, 2, 3, 5):
        counts = [sum(int(groups[j] == groups[i] and ids[j] != ids[i]) for j in draw)
                  for i in range(6) for draw in combinations([j for j in range(6) if j != i], size)]
        assert false_negative_density(split) * size == pytest.approx(sum(counts) / len(counts))


def test_the_study_scores_the_group_aware_recall_and_pairs_it_with_clip(results, data):
    """evaluate_heads reports group_rsum beside rsum (equal where every group is one image, at least rsum where
    groups are larger), and the table gives its paired difference from CLIP."""
    heads = results.runs["tiny"]["CLIP InfoNCE"][0].heads
    test = data["tiny"]["test"]
    grouped = study.evaluate_heads(heads, test)
    alone = study.evaluate_heads(heads, replace(test, groups=test.ids))
    assert alone["group_rsum"] == alone["rsum"] == grouped["rsum"] and grouped["group_rsum"] > grouped["rsum"]
    rows = summary_rows(results.runs)
    assert all(math.isfinite(r["d_group_rsum"]) for r in rows) and "Δ group_rsum vs CLIP" in markdown_table(rows)


def test_every_study_set_is_a_recipe_built_with_a_val_split():
    from fne_dist.data import recipes
    from fne_dist.data.make_shards import parse_args
    from fne_dist.study.data import DATASETS

    assert DATASETS == ("openclipart", "emoji", "openclipart-alt", "emoji-alias")
    for name in DATASETS:
        args = parse_args([name, "--out", "unused"])
        assert name in recipes.RECIPES and 0 < args.val_fraction and 0 < args.test_fraction
