"""Triplet losses: FNE's sampled-negative loss (FNE_SPEC step 8) and VSE++'s hardest in-batch negative (step 9); the
false-negative mask that the diagnostics measure them with; the merge of InfoNCE partials that the torch tiles
and the Triton kernels share (fne_dist.infonce, fne_kernels.fne_infonce)."""
from __future__ import annotations

import torch


def triplet_hinges(anchors: torch.Tensor, pos_keys: torch.Tensor, neg_keys: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """max(0, margin + a_i . n_i - a_i . p_i) per row [b] for one direction ([K, b] for K); the objective takes
    their (weighted) mean.  anchors [b, D] carry the gradient; pos_keys and neg_keys [b, D] are momentum keys and
    are detached, so image->text trains the image tower and text->image the text tower."""
    pos = (anchors * pos_keys.detach()).sum(-1)
    neg = (anchors * neg_keys.detach()).sum(-1)
    return (margin + neg - pos).clamp_min(0)


def vsepp_hardest(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, margin: float):
    """Per direction, each anchor's hardest in-batch violation (cost [b]) and its column (index [b]), pairs sharing
    an id masked: ((cost_i2t, index_i2t), (cost_t2i, index_t2i)).  The VSE++ max-violation loss is the mean of
    cost_i2t + cost_t2i (the scale of the sampled triplet loss summed over the two directions)."""
    s = img @ txt.T
    pos = s.diagonal()
    i2t, t2i = hardest_in_batch(s, ids)
    return tuple(((margin + hardest.values - pos).clamp_min(0), hardest.indices) for hardest in (i2t, t2i))


def hardest_in_batch(sims: torch.Tensor, ids: torch.Tensor | None = None):
    """Each row's and each column's hardest in-batch negative in sims [b, b] (row i and column i are pair i):
    `(values, indices)` of the row maxima and of the column maxima over the pairs of another id (ids None: another
    index).  -inf where a row or column has no such pair."""
    masked = sims.masked_fill(same_id(sims, ids), float("-inf"))
    return masked.max(1), masked.max(0)


def same_id(sims: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[b, b] True where row i and column j of an in-batch matrix are one pair or share an id (ids None: i == j),
    so never negatives of each other.  The one home of the same-id mask that VSE++, the statistics and the
    warm-up diagnostics share."""
    if ids is None:
        return torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    return ids[:, None] == ids[None, :]


def false_negative_mask(ids, labels, other_ids, other_labels) -> torch.Tensor:
    """True where the other item has the anchor's (known) label but another image id: a false negative (labels
    only measure them; the objectives read labels only as fne.oracle's identity keys)."""
    return (labels >= 0) & (other_labels >= 0) & (labels == other_labels) & (ids != other_ids)


def merge_partials(partials: torch.Tensor, exp=torch.exp) -> torch.Tensor:
    """Partial log-sum-exps of k disjoint candidate sets [k, n, 3] (per anchor: a running bound m of the logits,
    -inf for a set without candidates, the sum of exp(logit - m), the same sum over labelled false negatives) -> the
    partials of their union [n, 3], exactly (a shift of references to the largest m).  `exp`: torch.exp2 for
    partials in log2 units (the Triton kernels' splits)."""
    m = partials[..., 0].amax(0)
    weight = exp(partials[..., 0] - m.masked_fill(m == float("-inf"), 0))  # 0 for a set without candidates
    return torch.stack([m, (partials[..., 1] * weight).sum(0), (partials[..., 2] * weight).sum(0)], 1)
