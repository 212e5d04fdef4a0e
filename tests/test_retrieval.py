"""The group-aware recall (fne_dist/retrieval.py): a hit is any item of the query's group, ties as the exact metric
counts them; against a per-query loop, by hand, and equal to the exact recall when every group has one image."""
import pytest
import torch
import torch.nn.functional as F

from fne_dist.retrieval import KS, retrieval_metrics


def loop_reference(images, texts, owner, groups):
    """Group-aware R@k and rsum, one query at a time: rank = items outside the group scoring >= the group's best."""
    sims = images @ texts.T
    text_group = groups[owner]
    out = {}
    i2t = [int((sims[i][text_group != groups[i]] >= sims[i][text_group == groups[i]].max()).sum())
           for i in range(len(images))]
    t2i = [int((sims[:, t][groups != text_group[t]] >= sims[:, t][groups == text_group[t]].max()).sum())
           for t in range(len(texts))]
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"group_{name}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["group_rsum"] = sum(out[f"group_{d}_R@{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_group_recall_matches_a_per_query_loop_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randint(-2, 3, (60, 4), generator=g).float() + 1e-3 * (seed == 2), dim=1)
    owner = torch.cat([torch.arange(60), torch.randint(0, 60, (90,), generator=g)])
    texts = F.normalize(images[owner] + 0.8 * torch.randint(-1, 2, (150, 4), generator=g).float(), dim=1)
    groups = torch.randint(0, 25, (60,), generator=g)  # few distinct vectors: many exact ties
    got = retrieval_metrics(images, texts, owner, groups=groups)
    want = loop_reference(images, texts, owner, groups)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert all(got[k] >= got[k[len("group_"):]] for k in want)  # more hits, fewer ahead: never below the exact


def test_one_image_per_group_is_the_exact_recall():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(80, 8, generator=g), dim=1)
    owner = torch.arange(400) % 80
    texts = F.normalize(images[owner] + torch.randn(400, 8, generator=g), dim=1)
    got = retrieval_metrics(images, texts, owner, groups=torch.randperm(80, generator=g) * 7)
    exact = retrieval_metrics(images, texts, owner)
    assert {k: got[k] for k in exact} == exact  # the exact keys are unchanged by groups=
    assert {k: got[f"group_{k}"] for k in exact} == exact
    assert set(got) == set(exact) | {f"group_{k}" for k in exact}


def test_hand_made_group_hits_that_exact_recall_misses():
    # images 0 and 1 show the same thing (group 5), image 2 another (group 9); caption t -> image t
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    # sims [image, caption]: i0 (0.6, 1.0, 0), i1 (0.96, 0.8, 0.6), i2 (0.8, 0, 1)
    m = retrieval_metrics(images, texts, torch.arange(3), groups=torch.tensor([5, 5, 9]))
    # exact: i0 and i1 each rank the other's caption first; t0 ranks i1 and i2 above i0, t1 ranks i0 above i1
    assert (m["i2t_R@1"], m["t2i_R@1"]) == pytest.approx((100 / 3, 100 / 3))
    assert m["t2i_R@5"] == 100.0
    # group-aware: the other member's caption or image is a hit
    assert (m["group_i2t_R@1"], m["group_t2i_R@1"], m["group_rsum"]) == (100.0, 100.0, 600.0)
    # one group holding everything: every query is a hit; a tie with another group counts against it
    assert retrieval_metrics(images, texts, torch.arange(3), groups=torch.zeros(3))["group_rsum"] == 600.0
    tied = retrieval_metrics(images, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), torch.arange(3),
                             groups=torch.tensor([5, 9, 9]))
    # every image scores all captions alike: each ties with the other group's captions (i0: t1 and t2 -> rank 2)
    assert (tied["group_i2t_R@1"], tied["group_i2t_R@5"]) == (0.0, 100.0)
    # t0's image i0 scores highest; t1 and t2 find i0 (group 5) above their group's best i1 -> rank 1
    assert tied["group_t2i_R@1"] == pytest.approx(100 / 3)


def test_collapsed_model_scores_zero_group_aware_too():
    images = F.normalize(torch.ones(100, 8), dim=1)
    texts = F.normalize(torch.ones(500, 8), dim=1)
    m = retrieval_metrics(images, texts, torch.arange(500) // 5, groups=torch.arange(100) // 10)
    assert m["group_rsum"] == 0.0
