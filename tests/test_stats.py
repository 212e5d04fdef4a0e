"""SimilarityStats: the mutual top-1 rule, exact moments, reset policies, state."""
import pytest
import torch

from fne_dist.stats import SimilarityStats


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
