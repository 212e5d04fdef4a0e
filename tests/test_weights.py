"""fne_weights: every branch of FNE_SPEC step 7 against values computed by hand with `math`."""
import math

import pytest
import torch

from fne_dist.fne import FNEConfig, SimilarityStats, fne_weights, true_negative_prob

CFG = FNEConfig()  # tau 0.5, rho 1e4, false_margin 0.999, min_count 200, margin 0.2
READY = dict(count_pos=500, mean_pos=0.6, var_pos=0.01, mean_neg=0.3, var_neg=0.02)


def hand_density(s, mean, var):
    return math.exp(-((s - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def hand_official(s, p, stats=READY, cfg=CFG):
    h = math.exp(-cfg.tau * (s - p) ** 2)
    lp = hand_density(s, stats["mean_pos"], stats["var_pos"])
    ln = hand_density(s, stats["mean_neg"], stats["var_neg"])
    f = lp / (lp + (cfg.prior_ratio - 1) * ln)
    return math.exp(-cfg.tau * f) if 1 - f < cfg.false_margin else h


def weights(sims, pos, mask=None, cfg=CFG, stats=None, valid=None):
    sims = torch.tensor([sims], dtype=torch.float32)
    mask = torch.zeros_like(sims, dtype=torch.bool) if mask is None else torch.tensor([mask])
    stats = SimilarityStats.from_moments(**(stats or READY))
    return fne_weights(sims, torch.tensor([pos]), mask, stats, cfg, valid)[0]


@pytest.mark.parametrize("mode", ["official", "bayes", "eliminate"])
def test_hardness_only_below_min_count(mode):
    s = [0.41, 0.45, 0.62, 0.9]  # above the running mean's cut-down (0.4), which official applies already
    w = weights(s, 0.7, cfg=FNEConfig(mode=mode), stats=dict(READY, count_pos=200))  # not *more* than min_count
    assert torch.allclose(w, torch.tensor([math.exp(-0.5 * (x - 0.7) ** 2) for x in s]), rtol=1e-6)


def test_official_cuts_at_the_running_mean_before_min_count_like_the_released_code():
    # 0 < count <= min_count: the released choice_negative cuts s <= mu+ - margin with the running mean (0.6 - 0.2)
    # but keeps the hardness weight (the Bayes replacement waits for count > min_count)
    few = dict(READY, count_pos=10)
    s, p = [0.1, 0.39, 0.41, 0.62], 0.7
    want = [0.0, 0.0, math.exp(-0.5 * (0.41 - p) ** 2), math.exp(-0.5 * (0.62 - p) ** 2)]
    assert torch.allclose(weights(s, p, stats=few), torch.tensor(want), rtol=1e-6)
    # no positive counted yet: the released mean is 0/0 (NaN) and nothing is cut
    none = dict(READY, count_pos=0)
    want = [math.exp(-0.5 * (x - p) ** 2) for x in s]
    assert torch.allclose(weights(s, p, stats=none), torch.tensor(want), rtol=1e-6)


@pytest.mark.parametrize("mode", ["bayes", "eliminate"])
def test_bayes_and_eliminate_wait_for_statistics_before_the_global_cutdown(mode):
    cfg = FNEConfig(mode=mode)
    assert weights([0.1], 0.7, cfg=cfg, stats=dict(READY, count_pos=10))[0] > 0
    assert weights([0.1], 0.7, cfg=cfg)[0] == 0


def hand_keep(s, stats=READY, cfg=CFG):
    """1 - f by Bayes' rule with prior 1/rho, from the hand densities."""
    lp = hand_density(s, stats["mean_pos"], stats["var_pos"])
    ln = hand_density(s, stats["mean_neg"], stats["var_neg"])
    return (cfg.prior_ratio - 1) * ln / (lp + (cfg.prior_ratio - 1) * ln)


def test_eliminate_drops_likely_false_negatives_and_keeps_hardness_elsewhere():
    cfg = FNEConfig(mode="eliminate", prior_ratio=10.0, f_max=0.5)
    s, p = [0.45, 0.5, 0.55, 0.62, 0.7], 0.75  # f = 0.08, 0.21, 0.40, 0.63, 0.84
    want = [math.exp(-0.5 * (x - p) ** 2) if 1 - hand_keep(x, cfg=cfg) < 0.5 else 0.0 for x in s]
    assert 0 < sum(x > 0 for x in want) < len(s), "the case needs both kept and dropped candidates"
    assert torch.allclose(weights(s, p, cfg=cfg), torch.tensor(want), rtol=1e-6)


def test_hardness_mode_is_the_hardness_weight_with_the_cutdown():
    cfg = FNEConfig(mode="hardness")
    s, p = [0.1, 0.45, 0.62, 0.9], 0.7
    want = [0.0] + [math.exp(-0.5 * (x - p) ** 2) for x in s[1:]]  # 0.1 <= mu+ - margin = 0.4 is cut
    assert torch.allclose(weights(s, p, cfg=cfg), torch.tensor(want), rtol=1e-6)


def test_true_negative_prob_matches_bayes_rule_and_is_one_before_min_count():
    s = [0.2, 0.45, 0.6, 0.8]
    stats = SimilarityStats.from_moments(**READY)
    got = true_negative_prob(torch.tensor(s), stats, CFG)
    assert torch.allclose(got, torch.tensor([hand_keep(x) for x in s]), rtol=1e-5, atol=1e-7)
    early = SimilarityStats.from_moments(**dict(READY, count_pos=200))
    assert (true_negative_prob(torch.tensor(s), early, CFG) == 1).all()


def test_bayes_replacement_official():
    # s near mu+: a likely false negative (1 - f < 0.999), so w = exp(-tau * f)
    s, p = 0.62, 0.7
    lp, ln = hand_density(s, 0.6, 0.01), hand_density(s, 0.3, 0.02)
    f = lp / (lp + 9999 * ln)
    assert 1 - f < 0.999
    assert weights([s], p)[0].item() == pytest.approx(math.exp(-0.5 * f), rel=1e-6)
    # s well inside the negative mode: f tiny, the hardness weight stays
    s = 0.45
    assert weights([s], p)[0].item() == pytest.approx(math.exp(-0.5 * (s - p) ** 2), rel=1e-6)


def test_official_matches_released_rule_on_a_grid():
    s = [x / 100 for x in range(41, 100)]
    got = weights(s, 0.75)
    want = torch.tensor([hand_official(x, 0.75) for x in s], dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_nan_when_both_densities_underflow_keeps_hardness():
    tight = dict(count_pos=500, mean_pos=0.6, var_pos=1e-5, mean_neg=-0.5, var_neg=1e-5)
    s, p = 0.95, 0.9
    lp = -((s - 0.6) ** 2) / 2e-5  # about -6125: exp underflows in fp32 and in float64
    assert math.exp(lp) == 0
    w = weights([s], p, stats=tight)
    assert w[0].item() == pytest.approx(math.exp(-0.5 * (s - p) ** 2), rel=1e-6)


def test_positives_and_invalid_masked():
    w = weights([0.8, 0.8, 0.8], 0.7, mask=[True, False, False], valid=torch.tensor([True, True, False]))
    assert w[0] == 0 and w[1] > 0 and w[2] == 0


def test_anchor_cutdown():
    cfg = FNEConfig(cutdown="anchor")
    w = weights([0.49, 0.5, 0.51, 0.1], 0.7, cfg=cfg, stats=dict(READY, count_pos=0))
    assert w[0] == 0 and w[1] == 0 and w[2] > 0 and w[3] == 0


def test_cutdown_off_keeps_easy_negatives():
    assert weights([-0.5], 0.7, cfg=FNEConfig(cutdown="off"))[0] > 0


@pytest.mark.parametrize("s", [0.45, 0.62, 0.95])
def test_bayes_mode_is_hardness_times_true_negative_probability(s):
    cfg = FNEConfig(mode="bayes")
    lp, ln = hand_density(s, 0.6, 0.01), hand_density(s, 0.3, 0.02)
    f = lp / (lp + 9999 * ln)
    want = math.exp(-0.5 * (s - 0.7) ** 2) * (1 - f)
    assert weights([s], 0.7, cfg=cfg)[0].item() == pytest.approx(want, rel=1e-5)


def test_bayes_mode_never_nan():
    tight = dict(count_pos=500, mean_pos=0.6, var_pos=1e-5, mean_neg=-0.5, var_neg=1e-5)
    s = torch.linspace(-1, 1, 2001).tolist()
    w = weights(s, 0.9, cfg=FNEConfig(mode="bayes", cutdown="off"), stats=tight)
    assert torch.isfinite(w).all() and (w >= 0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(tau=0), "tau"), (dict(prior_ratio=1), "prior_ratio"), (dict(false_margin=1.0), "false_margin"),
    (dict(mode="strict"), "mode"), (dict(cutdown="row"), "cutdown"),
])
def test_config_rejects_invalid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        FNEConfig(**bad)
