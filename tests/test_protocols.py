"""Retrieval protocols: the COCO 1K five-fold average on a hand-made case with known recall."""
from __future__ import annotations

import pytest
import torch

from fne_dist.protocols import evaluate_protocol, format_table


def five_folds():
    """5 folds of 1000 one-hot images (local index j -> e_j, the same in every fold), 2 captions each.

    In fold f the first m = 100 (f + 1) images are "bad": their captions point at the next bad image, e_{j+1} + e_j / 2
    (no ties: ties count against the positive).
    Inside a fold a bad caption ranks its image 2nd (R@1 miss, R@5 hit) and a bad image finds its captions behind
    the 2 captions that point at it (R@1 miss, R@5 hit): R@1 = 90, 80, 70, 60, 50 per fold, 70 on average.
    """
    eye = torch.eye(1000)
    images, texts, owner = [], [], []
    for f in range(5):
        m = 100 * (f + 1)
        images.append(eye)
        for j in range(1000):
            target = (j + 1) % m if j < m else j
            caption = eye[target] + 0.5 * eye[j] if j < m else eye[j]
            texts += [caption, caption]
            owner += [f * 1000 + j] * 2
    return torch.cat(images), torch.nn.functional.normalize(torch.stack(texts), dim=1), torch.tensor(owner)


def test_coco1k_five_fold_known_recall():
    images, texts, owner = five_folds()
    perm = torch.randperm(len(owner), generator=torch.Generator().manual_seed(0))  # caption order is irrelevant
    r = evaluate_protocol(images, texts[perm], owner[perm], "coco1k")
    assert r["i2t_R@1"] == pytest.approx(70.0) and r["t2i_R@1"] == pytest.approx(70.0)
    # R@5 = 100 only inside folds: across the whole 5K a bad caption has 5 images above its own (one per fold)
    assert r["i2t_R@5"] == r["t2i_R@5"] == r["i2t_R@10"] == r["t2i_R@10"] == pytest.approx(100.0)
    assert r["rsum"] == pytest.approx(540.0) and (r["images"], r["texts"]) == (5000, 10000)


def test_coco1k_group_aware_per_fold():
    """The bad images of a fold as one group (each fold its own): a bad caption's group holds the image it points
    at and a bad image's group the captions pointing at it, so the group-aware recall is perfect in every fold."""
    images, texts, owner = five_folds()
    local = torch.arange(5000) % 1000
    fold = torch.arange(5000) // 1000
    groups = torch.where(local < 100 * (fold + 1), fold, 10 + torch.arange(5000))
    r = evaluate_protocol(images, texts, owner, "coco1k", groups=groups)
    assert r["rsum"] == pytest.approx(540.0)  # the exact keys as without groups
    assert r["group_i2t_R@1"] == r["group_t2i_R@1"] == pytest.approx(100.0)
    assert r["group_rsum"] == pytest.approx(600.0)


def test_named_protocols_check_the_split_size():
    images, texts, owner = torch.eye(4), torch.eye(4), torch.arange(4)
    r = evaluate_protocol(images, texts, owner, "full")
    assert r["rsum"] == pytest.approx(600.0) and (r["images"], r["texts"]) == (4, 4)
    for name, size in (("flickr1k", 1000), ("coco5k", 5000), ("coco1k", 5000)):
        with pytest.raises(ValueError, match=f"needs the {size}-image Karpathy test split, got 4 images"):
            evaluate_protocol(images, texts, owner, name)
    with pytest.raises(ValueError, match="unknown protocol 'coco'"):
        evaluate_protocol(images, texts, owner, "coco")
    flickr = torch.nn.functional.normalize(torch.randn(1000, 8), dim=1)
    assert evaluate_protocol(flickr, flickr.repeat(5, 1), torch.arange(1000).repeat(5), "flickr1k")["images"] == 1000


def test_format_table():
    images, texts, owner = torch.eye(4), torch.eye(4), torch.arange(4)
    table = format_table({"full": evaluate_protocol(images, texts, owner, "full")})
    header, row = table.splitlines()
    assert header.split() == ["images", "texts", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                              "rsum"]
    assert row.split() == ["full", "4", "4"] + ["100.00"] * 6 + ["600.00"]
    grouped = format_table({"full": evaluate_protocol(images, texts, owner, "full", groups=torch.arange(4))})
    assert grouped.splitlines()[0].split()[-7:] == ["group_i2t_R@1", "group_i2t_R@5", "group_i2t_R@10",
                                                   "group_t2i_R@1", "group_t2i_R@5", "group_t2i_R@10", "group_rsum"]
