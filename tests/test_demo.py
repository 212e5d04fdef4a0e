"""The demo's variants and table (fne_dist/demo.py): CLIP beside VSE++ and FNE on the same budget, with the
group-aware rsum; a variant that picks no negatives shows no pick share."""
from fne_dist.config import load_config
from fne_dist.demo import CONFIG, table, variants


def test_every_variant_is_the_demo_budget_with_its_objective():
    runs = {folder: load_config(CONFIG, overrides) for _, folder, overrides in variants(8)}
    assert (runs["clip"].fne.objective, runs["vsepp"].fne.warmup_epochs) == ("clip", 8)
    assert {cfg.fne.objective for folder, cfg in runs.items() if folder != "clip"} == {"fne"}
    assert len({(cfg.train.epochs, cfg.data.batch_size, cfg.fne.queue_size) for cfg in runs.values()}) == 1


def test_table_shows_group_rsum_and_no_pick_share_for_clip():
    metrics = {"i2t_R@1": 1.0, "i2t_R@5": 2.0, "i2t_R@10": 3.0, "t2i_R@1": 4.0, "t2i_R@5": 5.0, "t2i_R@10": 6.0,
               "rsum": 21.0, "group_rsum": 250.5}
    rows = {"CLIP InfoNCE": {"eval": metrics, "false_negative_share": float("nan"),
                             "false_negative_loss_share": 0.25},
            "FNE bayes": {"eval": metrics, "false_negative_share": 0.5, "false_negative_loss_share": 0.125}}
    header, clip, fne = (line.split() for line in table(rows).splitlines())
    assert header[-7:] == ["rsum", "group_rsum", "FN", "share", "FN", "loss", "share"]
    assert clip[-3:] == ["250.50", "—", "25.0%"] and fne[-3:] == ["250.50", "50.0%", "12.5%"]
