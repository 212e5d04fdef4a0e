"""Losses: the FNE triplet hinge has the dense computation's gradient; VSE++ on a hand-made case."""
import torch
import torch.nn.functional as F

from fne_dist.losses import triplet_hinges, vsepp_hardest


def vsepp_loss(img, txt, ids, margin):
    (i2t, _), (t2i, _) = vsepp_hardest(img, txt, ids, margin)
    return (i2t + t2i).mean()


def test_fne_loss_gradient_equals_dense_autograd_gradient():
    torch.manual_seed(0)
    b, n, d, margin = 7, 50, 16, 0.2
    anchors = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    candidates = F.normalize(torch.randn(n, d), dim=1)
    pos = F.normalize(torch.randn(b, d), dim=1)
    index = torch.randint(0, n, (b,))

    dense = anchors @ candidates.T  # the whole [b, N] matrix, as a dense implementation would hold it
    p = (anchors * pos).sum(1)
    dense_loss = (margin + dense.gather(1, index[:, None])[:, 0] - p).clamp_min(0).mean()
    (dense_grad,) = torch.autograd.grad(dense_loss, anchors)

    loss = triplet_hinges(anchors, pos, candidates[index], margin).mean()
    (grad,) = torch.autograd.grad(loss, anchors)
    assert torch.allclose(loss, dense_loss) and torch.allclose(grad, dense_grad, atol=1e-7)


def test_fne_loss_keys_carry_no_gradient():
    anchors = torch.randn(3, 4, requires_grad=True)
    keys = torch.randn(3, 4, requires_grad=True)
    triplet_hinges(anchors, keys, keys.flip(0), 0.2).mean().backward()
    assert keys.grad is None and anchors.grad is not None


def test_vsepp_hand_case_with_same_id_masking():
    img = torch.eye(3)
    txt = torch.tensor([[0.9, 0.3, 0.0], [0.5, 0.8, 0.0], [0.0, 0.0, 1.0]])
    # S = img @ txt.T = txt.T: S[i, j] = txt[j, i]
    s = img @ txt.T
    ids = torch.tensor([0, 1, 2])
    i2t = [max(0.0, 0.2 + s[i, j].item() - s[i, i].item()) for i in range(3) for j in range(3) if j != i]
    t2i = [max(0.0, 0.2 + s[j, i].item() - s[i, i].item()) for i in range(3) for j in range(3) if j != i]
    want = sum(max(i2t[2 * i:2 * i + 2]) + max(t2i[2 * i:2 * i + 2]) for i in range(3)) / 3
    assert torch.isclose(vsepp_loss(img, txt, ids, 0.2), torch.tensor(want))
    # rows 0 and 1 share an image id: their cross pairs are positives, not negatives
    same = torch.tensor([0, 0, 2])
    masked_i2t = [max(0.0, 0.2 + s[i, 2].item() - s[i, i].item()) if i < 2 else max(i2t[4:6]) for i in range(3)]
    masked_t2i = [max(0.0, 0.2 + s[2, i].item() - s[i, i].item()) if i < 2 else max(t2i[4:6]) for i in range(3)]
    assert torch.isclose(vsepp_loss(img, txt, same, 0.2), torch.tensor((sum(masked_i2t) + sum(masked_t2i)) / 3))


def test_hardest_in_batch_skips_pairs_sharing_an_id():
    from fne_dist.losses import hardest_in_batch

    sims = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.9, 0.6], [0.5, 0.2, 0.9]])
    rows, cols = hardest_in_batch(sims, torch.tensor([0, 0, 1]))  # pairs 0 and 1 show the same image
    assert rows.indices.tolist() == [2, 2, 0] and cols.indices.tolist() == [2, 2, 1]
    rows, _ = hardest_in_batch(sims, torch.tensor([4, 4, 4]))
    assert torch.isinf(rows.values).all()  # no negative at all: -inf
    rows, _ = hardest_in_batch(sims)  # ids None: only the diagonal is masked
    assert rows.indices.tolist() == [1, 0, 0]
