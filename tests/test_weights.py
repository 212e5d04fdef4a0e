"""fne_weights: every branch of FNE_SPEC step 7 against values computed by hand with `math`."""
import math

import pytest
import torch

from fne_dist.fne import FNEConfig, SimilarityStats, fne_weights

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


def test_hardness_only_below_min_count():
    s = [0.1, 0.45, 0.62, 0.9]
    w = weights(s, 0.7, stats=dict(READY, count_pos=200))  # not *more* than min_count
    assert torch.allclose(w, torch.tensor([math.exp(-0.5 * (x - 0.7) ** 2) for x in s]), rtol=1e-6)


def test_global_cutdown_waits_for_statistics():
    # 0.1 <= mu+ - margin = 0.4, but with too few positives mu+ is unknown: no cut-down yet
    assert weights([0.1], 0.7, stats=dict(READY, count_pos=10))[0] > 0
    assert weights([0.1], 0.7)[0] == 0


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
