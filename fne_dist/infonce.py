"""FNE's posterior inside a contrastive loss: InfoNCE over [global batch ; buffer] (FNE_SPEC "Beyond the released
rule").

    L_i = -log( exp(t p_i) / (exp(t p_i) + sum_j (1 - f_ij) exp(t s_ij)) ),   t = logit scale = 1 / temperature

over the candidates j of another id than the anchor (valid slots only); `1 - f` is `true_negative_prob`, so a
likely false negative leaves the denominator.  The candidates and the positive keys are momentum keys (constants)
and the posterior weights are sampling-like constants (no gradient through f): the gradient flows into the anchors
and the logit scale only.

`posterior_infonce` streams the candidates in tiles and never holds [b, N]: the forward keeps an online
log-sum-exp per row, the backward makes a second pass that accumulates sum_j softmax_ij k_j (as attention kernels
do); it reads log(1 - f) as -softplus of the quadratic log-odds (`weights.false_negative_log_odds`, tested against
`true_negative_prob`).  `dense_posterior_infonce` is the autograd reference the tests compare it with.  On CUDA
`impl="auto"` runs the same two passes fused in Triton (kernels/fne_infonce.py), tested against this path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.losses import false_negative_mask, infonce_gradients
from fne_dist.sampler import DEFAULT_TILE_ELEMENTS, compiled_step
from fne_dist.stats import SimilarityStats
from fne_dist.weights import IMPLS, FNEConfig, false_negative_log_odds, log_odds_coefficients, true_negative_prob


@dataclass
class CandidateSet:
    """What one direction's loss reads: keys [N, D] with ids [N], labels [N] (-1: unknown), valid [N] bool,
    and the anchors' ids [b] and labels [b] (labels only measure false negatives)."""

    keys: torch.Tensor
    key_ids: torch.Tensor
    key_labels: torch.Tensor
    valid: torch.Tensor
    anchor_ids: torch.Tensor
    anchor_labels: torch.Tensor


def _tile_terms(s, scale, coefficients, anchor_ids, key_ids, valid):
    """(u, w) of one tile of similarities s with the logit t s + log(1 - f) = u + log(w): u = t s - max(x, 0) (-inf
    off the candidate set) and w = 1 / (1 + exp(-|x|)) in [1/2, 1], x the log-odds of a false negative
    (log(1 - f) = -softplus(x)).  u bounds the logit within log 2, so it serves as the running max: two exp and a
    division per candidate, no log, and no [b, T] logits to reduce twice."""
    x = false_negative_log_odds(s, coefficients)
    drop = (anchor_ids[:, None] == key_ids[None, :]) | ~valid[None, :]
    u = (s * scale).sub_(x.clamp_min(0)).masked_fill_(drop, float("-inf"))
    return u, x.abs_().neg_().exp_().add_(1).reciprocal_()


def forward_tile(s, m, scale, coefficients, anchor_ids, anchor_labels, key_ids, key_labels, valid):
    """The forward's step over one tile (`compiled_step` fuses it on the CPU): the new running bound m (the largest
    u; the sums are exact for any m that keeps exp(u - m) <= 1), the factor that rescales the old sums to it, and
    the tile's sums of exp(logit - m) over all candidates and over labelled false negatives."""
    u, w = _tile_terms(s, scale, coefficients, anchor_ids, key_ids, valid)
    m_new = torch.maximum(m, u.max(1).values)
    e = (u - m_new[:, None]).exp() * w
    false_neg = valid[None, :] & false_negative_mask(anchor_ids[:, None], anchor_labels[:, None], key_ids[None, :],
                                                     key_labels[None, :])
    return m_new, (m - m_new).exp(), e.sum(1), (e * false_neg).sum(1)


def backward_tile(s, lse, scale, coefficients, anchor_ids, key_ids, valid):
    """The backward's step over one tile: the softmax probabilities P [b, T] and sum_j P_ij s_ij."""
    u, w = _tile_terms(s, scale, coefficients, anchor_ids, key_ids, valid)
    prob = (u - lse[:, None]).exp() * w
    return prob, (prob * s).sum(1)


class _PosteriorInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, scale, pos_keys, cand: CandidateSet, stats, cfg, tile):
        a = anchors.detach().float()
        t = scale.detach().float()
        coefficients = log_odds_coefficients(stats, cfg, a.device)
        pos = (a * pos_keys.float()).sum(1)
        m = pos * t  # running bound of the row's logits (see _tile_terms), starting with the positive's
        total = torch.ones_like(m)  # sum exp(logit - m) over the positive and the candidates so far
        false_mass = torch.zeros_like(m)  # ... over labelled false negatives only
        for start in range(0, len(cand.keys), tile):
            at = slice(start, start + tile)
            m, rescale, tile_total, tile_false = compiled_step(
                "infonce_forward", forward_tile, a @ cand.keys[at].float().T, m, t, coefficients, cand.anchor_ids,
                cand.anchor_labels, cand.key_ids[at], cand.key_labels[at], cand.valid[at])
            total = total * rescale + tile_total
            false_mass = false_mass * rescale + tile_false
        lse = m + total.log()
        ctx.save_for_backward(a, t, pos_keys, pos, lse, coefficients)
        ctx.cand, ctx.tile, ctx.dtype = cand, tile, anchors.dtype
        false_prob = false_mass / total  # softmax mass on labelled false negatives
        ctx.mark_non_differentiable(false_prob)
        return lse - pos * t, false_prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_false_prob):
        a, t, pos_keys, pos, lse, coefficients = ctx.saved_tensors
        cand = ctx.cand
        pull = torch.zeros_like(a)  # sum_j softmax_ij k_j
        pull_sim = torch.zeros_like(pos)  # sum_j softmax_ij s_ij
        for start in range(0, len(cand.keys), ctx.tile):
            at = slice(start, start + ctx.tile)
            keys = cand.keys[at].float()
            prob, tile_sim = compiled_step("infonce_backward", backward_tile, a @ keys.T, lse, t, coefficients,
                                           cand.anchor_ids, cand.key_ids[at], cand.valid[at])
            pull += prob @ keys
            pull_sim += tile_sim
        grad_anchors, grad_scale = infonce_gradients(grad_loss, t, pos_keys, pos, (pos * t - lse).exp(), pull,
                                                     pull_sim)
        return grad_anchors.to(ctx.dtype), grad_scale, None, None, None, None, None


def posterior_infonce(anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor, cand: CandidateSet,
                      stats: SimilarityStats, cfg: FNEConfig, tile_size: int | None = None, impl: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses [b] (gradient into `anchors` [b, D] and the 0-dim or 1-element logit `scale`) and, per row,
    the softmax probability that falls on labelled false negatives [b] (no gradient; the row's whole negative
    mass is 1 - exp(-loss)).

    pos_keys [b, D] are the anchors' own momentum keys; memory O(b * tile_size) for any number of candidates.
    `impl`: "torch" (this module's streaming tiles, the reference), "triton" (the fused kernels,
    fne_kernels.fne_infonce; `tile_size` is the torch path's only), "auto" (triton for CUDA tensors, torch
    otherwise); "dense" (fne.impl's dense sampler) runs the torch path: this loss never holds [b, N].
    """
    if impl not in IMPLS:
        raise ValueError(f"posterior_infonce impl={impl!r} is unknown: use one of {IMPLS}")
    if impl == "triton" or (impl == "auto" and anchors.is_cuda):
        from fne_kernels import triton_posterior_infonce

        return triton_posterior_infonce(anchors, scale, pos_keys, cand, stats, cfg)
    tile = tile_size or max(1, DEFAULT_TILE_ELEMENTS // max(len(anchors), 1))
    return _PosteriorInfoNCE.apply(anchors, scale, pos_keys.detach(), cand, stats, cfg, tile)


def dense_posterior_infonce(anchors, scale, pos_keys, cand: CandidateSet, stats, cfg) -> torch.Tensor:
    """The reference: the whole [b, N] logit matrix and autograd; per-row losses [b]."""
    s = anchors.float() @ cand.keys.float().T
    drop = (cand.anchor_ids[:, None] == cand.key_ids[None, :]) | ~cand.valid[None, :]
    log_w = true_negative_prob(s.detach(), stats, cfg).log()
    logits = (s * scale + log_w).masked_fill(drop, float("-inf"))
    pos = (anchors.float() * pos_keys.float().detach()).sum(1, keepdim=True) * scale
    return -torch.cat([pos, logits], 1).log_softmax(1)[:, 0]
