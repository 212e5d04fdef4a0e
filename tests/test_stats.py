"""SimilarityStats: the mutual top-1 rule, exact moments, reset policies, state; the negatives of the negative
Gaussian (neg_fit) and the prior fitted by EM (prior_fit)."""
import functools
import math

import pytest
import torch

from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, fne_weights, log_odds_coefficients, prior_e_step, true_negative_prob


def test_batch_moments_follow_the_mutual_top1_rule():
    # S = img @ txt.T is the matrix below (img = identity)
    s = torch.tensor([[0.9, 0.2, 0.1],
                      [0.3, 0.5, 0.6],   # row 1: its best text is text 2, so it does not count
                      [0.0, 0.4, 0.8]])
    m = SimilarityStats.batch_moments(torch.eye(3), s.T.contiguous())
    pos = [0.9, 0.8]
    negs = [0.2, 0.3, 0.4, 0.6]  # hardest negatives: row 0 -> 0.2, col 0 -> 0.3; row 2 -> 0.4, col 2 -> 0.6
    want = [2, sum(pos), sum(x * x for x in pos), 4, sum(negs), sum(x * x for x in negs)]
    assert torch.allclose(m, torch.tensor(want, dtype=torch.float64), atol=1e-7)


def test_pairs_sharing_an_id_are_not_negatives():
    s = torch.tensor([[0.9, 0.85, 0.1], [0.8, 0.95, 0.2], [0.3, 0.0, 0.7]])
    m = SimilarityStats.batch_moments(torch.eye(3), s.T.contiguous(), ids=torch.tensor([5, 5, 6]))
    negs = [0.1, 0.3, 0.2, 0.0, 0.3, 0.2]  # rows 0, 1 skip each other; row 2 -> 0.3 (row), 0.2 (col)
    assert m[3] == 6 and torch.isclose(m[4], torch.tensor(sum(negs), dtype=torch.float64))


def test_from_moments_and_reset_policies():
    stats = SimilarityStats.from_moments(count_pos=500, mean_pos=0.6, var_pos=0.01, mean_neg=0.3, var_neg=0.02)
    mp, vp, mn, vn = (x.item() for x in stats.moments())
    assert (mp, vp, mn, vn) == pytest.approx((0.6, 0.01, 0.3, 0.02))
    assert stats.ready(200) and not stats.ready(500)
    stats.new_epoch()
    assert stats.count_pos == 0
    never = SimilarityStats.from_moments(count_pos=5, mean_pos=0.6, var_pos=0.01, mean_neg=0.3, var_neg=0.02,
                                         reset="never")
    never.new_epoch()
    assert never.count_pos == 5


def test_ema_decays_old_moments():
    stats = SimilarityStats(reset="ema", ema_decay=0.5)
    img = torch.eye(2)
    for _ in range(3):
        stats.update(img, img)
    assert stats.count_pos.item() == pytest.approx(2 * (1 + 0.5 + 0.25))


def test_bad_settings_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match="reset"):
        SimilarityStats(reset="daily")
    with pytest.raises(ValueError, match="checkpoint's setting"):
        SimilarityStats(reset="never").load_state_dict(SimilarityStats(reset="epoch").state_dict())


def test_a_checkpoint_of_another_ema_decay_is_refused_not_taken():
    stats = SimilarityStats(reset="ema", ema_decay=0.9)
    with pytest.raises(ValueError, match=r"checkpoint ema_decay=0\.5, this run ema_decay=0\.9"):
        stats.load_state_dict(SimilarityStats(reset="ema", ema_decay=0.5).state_dict())
    assert stats.ema_decay == 0.9


def test_neg_fit_all_takes_the_moments_of_every_pair_of_another_id():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5])
    s = (img @ txt.T).double()
    negs = s[ids[:, None] != ids[None, :]]
    m = SimilarityStats.batch_moments(img, txt, ids, neg_fit="all")
    torch.testing.assert_close(m[3:], torch.stack([torch.tensor(len(negs), dtype=torch.float64), negs.sum(),
                                                   (negs**2).sum()]))
    assert torch.equal(m[:3], SimilarityStats.batch_moments(img, txt, ids)[:3])  # the positives do not change
    with pytest.raises(ValueError, match="neg_fit"):
        SimilarityStats(neg_fit="some")


def mixture(n, prior, generator):
    """n similarities: a share `prior` from N(0.5, 0.1^2) (false negatives), the rest from N(0.2, 0.1^2): components
    3 standard deviations apart, so that the responsibilities depend on the prior and EM has to iterate."""
    false = torch.rand(n, generator=generator) < prior
    return 0.1 * torch.randn(n, generator=generator) + torch.where(false, 0.5, 0.2), false


def fitted_prior(stats) -> float:
    return 1 / (1 + math.exp(stats.log_prior_odds(100.0).item()))


def test_em_recovers_a_known_mixtures_prior():
    """The components fixed at the mixture's (huge counts, so that the batches do not move them), the prior
    starting at 1/100: the online EM over in-batch pairs of another id climbs to the mixture's weight 0.05."""
    stats = SimilarityStats.from_moments(count_pos=1e30, mean_pos=0.5, var_pos=0.1**2, mean_neg=0.2,
                                         var_neg=0.1**2, reset="ema", ema_decay=0.8, prior_fit=True)
    assert fitted_prior(stats) == pytest.approx(0.01)  # nothing weighed yet: the setting's prior
    e_step = functools.partial(prior_e_step, FNEConfig(prior_ratio=100.0, min_count=200))
    g = torch.Generator().manual_seed(0)
    b = 120
    fits, shares = [], []
    for _ in range(40):
        s, false = mixture(b * b, 0.05, g)
        shares.append(false[~torch.eye(b, dtype=torch.bool).flatten()].float().mean().item())
        # img = S, txt = I, so that the in-batch matrix img . txt^T is S (the diagonal, pairs of one id, is ignored)
        stats = stats.updated(s.view(b, b), torch.eye(b), e_step=e_step)
        fits.append(fitted_prior(stats))
    assert fits[0] < 0.035  # one E-step from 0.01 falls short: the responsibilities depend on the prior
    assert fits[-1] == pytest.approx(0.05, abs=0.003) and sum(shares) / 40 == pytest.approx(0.05, abs=0.001)


def test_em_waits_for_ready_statistics_and_follows_the_reset_policy():
    rule = FNEConfig(prior_ratio=100.0, min_count=200)
    e_step = functools.partial(prior_e_step, rule)
    young = SimilarityStats.from_moments(count_pos=10, mean_pos=0.7, var_pos=0.01, mean_neg=0.2, var_neg=0.01,
                                         prior_fit=True)
    s = torch.rand(6, 6)
    assert young.updated(s, torch.eye(6), e_step=e_step).prior_sums.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="e_step"):
        young.updated(s, torch.eye(6))
    stats = SimilarityStats.from_moments(count_pos=500, mean_pos=0.7, var_pos=0.01, mean_neg=0.2, var_neg=0.01,
                                         prior_fit=True)
    stats = stats.updated(s, torch.eye(6), e_step=e_step)
    assert stats.prior_sums[0] == 30  # the 6 x 6 pairs less the diagonal
    again = SimilarityStats(prior_fit=True)
    again.load_state_dict(stats.state_dict())
    assert torch.equal(again.prior_sums, stats.prior_sums)
    stats.new_epoch()
    assert stats.prior_sums.tolist() == [0.0, 0.0] and fitted_prior(stats) == pytest.approx(0.01)


def test_the_fitted_prior_is_the_prior_of_every_rule():
    """Statistics whose fitted prior is 1/20 weigh exactly as a preset prior_ratio of 20: fne_weights in every mode
    (the rule the samplers use), true_negative_prob and the quadratic log-odds (the InfoNCE paths, the sampler
    kernel)."""
    fitted = SimilarityStats.from_moments(count_pos=500, mean_pos=0.6, var_pos=0.01, mean_neg=0.3, var_neg=0.02,
                                          prior_fit=True)
    fitted.prior_sums = torch.tensor([400.0, 20.0], dtype=torch.float64)
    preset = SimilarityStats.from_moments(count_pos=500, mean_pos=0.6, var_pos=0.01, mean_neg=0.3, var_neg=0.02)
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(16, 50, generator=g) * 1.2 - 0.2
    pos = torch.rand(16, generator=g) * 0.3 + 0.5
    mask = torch.zeros(16, 50, dtype=torch.bool)
    for mode in ("official", "bayes", "eliminate"):
        got = fne_weights(sims, pos, mask, fitted, FNEConfig(prior_ratio=1e4, mode=mode))
        want = fne_weights(sims, pos, mask, preset, FNEConfig(prior_ratio=20.0, mode=mode))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(true_negative_prob(sims, fitted, FNEConfig(prior_ratio=1e4)),
                               true_negative_prob(sims, preset, FNEConfig(prior_ratio=20.0)), rtol=1e-6, atol=0)
    torch.testing.assert_close(log_odds_coefficients(fitted, FNEConfig(prior_ratio=1e4), "cpu"),
                               log_odds_coefficients(preset, FNEConfig(prior_ratio=20.0), "cpu"), rtol=1e-6, atol=0)
