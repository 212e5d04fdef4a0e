"""FNE's posterior inside a contrastive loss: InfoNCE over [global batch ; buffer] (FNE_SPEC "Beyond the released
rule").

    L_i = -log( exp(t p_i) / (exp(t p_i) + sum_j (1 - f_ij) exp(t s_ij)) ),   t = logit scale = 1 / temperature

over the candidates j of another id than the anchor (valid slots only); `1 - f` is `true_negative_prob`, so a
likely false negative leaves the denominator.  The candidates and the positive keys are momentum keys (constants)
and the posterior weights are sampling-like constants (no gradient through f): the gradient flows into the anchors
and the logit scale only.

The loss streams the candidates in tiles and never holds [b, N]: the forward keeps an online log-sum-exp per row,
the backward makes a second pass that accumulates sum_j softmax_ij k_j (as attention kernels do).  The candidates
are `Candidates` runs read in place (the buffer's segments: no per-step copy of the ring), and both passes are sums
over candidates, so disjoint candidate sets combine exactly:
  forward: each set gives per anchor a partial log-sum-exp, (a running bound m of the logits, sum of
    exp(logit - m), the same sum over labelled false negatives) [n, 3]; `combine_partials` joins them with the
    positive's logit (`fne_dist.losses.merge_partials`: a shift of references);
  backward: each set gives per anchor its share of sum_j P_ij k_j and of sum_j P_ij s_ij [n, D + 1], which add.
Sharded (the sharded buffer, `fne_dist.buffer`), every rank holds one such set: the anchors are all-gathered, each
rank computes the partials of all G anchors over its shard, and an all-to-all sends each anchor's world partials
to its rank, which combines them; the backward all-gathers the G log-sum-exps, each rank computes its shard's
gradient partials for all G anchors and an all-to-all sends them back the same way.  Traffic per rank and
direction: G x D (anchors) + 3 G (partials) forward, G + G x (D + 1) backward: O(G x D), independent of the buffer.
Each tile reads log(1 - f) as -softplus of the quadratic log-odds (`weights.false_negative_log_odds`, tested
against `true_negative_prob`), in one step that `sampler.compiled_step` fuses on large CPU tiles.
Two providers give these partials, picked by `impl` for every run alike: the torch tiles here (`lse_partials`,
`pull_partials` stream all runs), and the fused Triton kernels (kernels/fne_infonce.py: `triton_lse_partials`,
`triton_pull_partials`, one run each; "triton", or "auto" on CUDA tensors).  One autograd Function
(`_PosteriorInfoNCE`) serves both, over one run or several, on one process or sharded.
`dense_posterior_infonce` is the autograd reference the tests compare with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.distributed import all_gather_cat, all_to_all, world_size
from fne_dist.losses import false_negative_mask, merge_partials
from fne_dist.sampler import DEFAULT_TILE_ELEMENTS, compiled_step
from fne_dist.stats import SimilarityStats
from fne_dist.weights import IMPLS, FNEConfig, false_negative_log_odds, log_odds_coefficients, true_negative_prob


@dataclass
class Candidates:
    """One run of candidates read in place: keys [n, D] (any float dtype; each tile is read in fp32), ids [n],
    labels [n] (-1: unknown), valid [n] bool or None (all valid)."""

    keys: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor | None


@dataclass
class CandidateSet:
    """One direction's candidates as one set: keys [N, D] with ids [N], labels [N] (-1: unknown), valid [N] bool,
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
    division per candidate, no log, and no [n, T] logits to reduce twice."""
    x = false_negative_log_odds(s, coefficients)
    drop = anchor_ids[:, None] == key_ids[None, :]
    if valid is not None:
        drop |= valid[None, :] == 0  # bool, or uint8 in a compiled step (`sampler.compiled_step`)
    u = (s * scale).sub_(x.clamp_min(0)).masked_fill_(drop, float("-inf"))
    return u, x.abs_().neg_().exp_().add_(1).reciprocal_()


def forward_tile(s, m, scale, coefficients, anchor_ids, anchor_labels, key_ids, key_labels, valid):
    """The forward's step over one tile (`compiled_step` fuses it on the CPU): the new running bound m (the largest
    u, -inf while a row has no candidate; the sums are exact for any m that keeps exp(u - m) <= 1), the factor that
    rescales the old sums to it, and the tile's sums of exp(logit - m) over all candidates and over labelled false
    negatives (excluded slots add exp(-inf) = 0)."""
    u, w = _tile_terms(s, scale, coefficients, anchor_ids, key_ids, valid)
    m_new = torch.maximum(m, u.max(1).values)
    ref = m_new.masked_fill(m_new == float("-inf"), 0)  # a finite reference: exp(-inf - ref) = 0, never nan
    e = (u - ref[:, None]).exp() * w
    false_neg = false_negative_mask(anchor_ids[:, None], anchor_labels[:, None], key_ids[None, :], key_labels[None, :])
    return m_new, (m - ref).exp(), e.sum(1), (e * false_neg).sum(1)


def backward_tile(s, lse, scale, coefficients, anchor_ids, key_ids, valid):
    """The backward's step over one tile: the softmax probabilities P [n, T] and sum_j P_ij s_ij."""
    u, w = _tile_terms(s, scale, coefficients, anchor_ids, key_ids, valid)
    prob = (u - lse[:, None]).exp() * w
    return prob, (prob * s).sum(1)


def _tiles(runs: list[Candidates], tile: int):
    for run in runs:
        for start in range(0, len(run.ids), tile):
            at = slice(start, start + tile)
            yield run.keys[at].float(), run.ids[at], run.labels[at], None if run.valid is None else run.valid[at]


def lse_partials(a, scale, runs: list[Candidates], anchor_ids, anchor_labels, coefficients, tile: int,
                 fused: bool = False) -> torch.Tensor:
    """[n, 3] per anchor of a [n, D] over these candidates (posterior from `log_odds_coefficients`): a running bound
    m of its logits (-inf: none), the sum of exp(logit - m) and the same sum over labelled false negatives (0, 0
    where there is none).  fused: each run's partials from the Triton kernels, merged (`tile` unused)."""
    m = torch.full((len(a),), float("-inf"), device=a.device)
    if fused:
        from fne_kernels import triton_lse_partials

        neutral = torch.stack([m, torch.zeros_like(m), torch.zeros_like(m)], 1)
        return merge_partials(torch.stack([neutral, *(triton_lse_partials(a, scale, run, anchor_ids, anchor_labels,
                                                                          coefficients) for run in runs)]))
    total, false_mass = torch.zeros_like(m), torch.zeros_like(m)
    for keys, ids, labels, valid in _tiles(runs, tile):
        m, rescale, tile_total, tile_false = compiled_step("infonce_forward", forward_tile, a @ keys.T, m, scale,
                                                           coefficients, anchor_ids, anchor_labels, ids, labels, valid)
        total = total * rescale + tile_total
        false_mass = false_mass * rescale + tile_false
    return torch.stack([m, total, false_mass], 1)


def combine_partials(pos_logit: torch.Tensor, partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp over the positive (logit [n]) and every candidate, and the softmax mass on labelled false
    negatives [n], from the partials [k, n, 3] of k disjoint candidate sets (exact: a shift of references)."""
    positive = torch.stack([pos_logit, torch.ones_like(pos_logit), torch.zeros_like(pos_logit)], 1)
    m, total, false_mass = merge_partials(torch.cat([positive[None], partials])).unbind(1)
    return m + total.log(), false_mass / total


def pull_partials(a, scale, lse, runs: list[Candidates], anchor_ids, coefficients, tile: int,
                  fused: bool = False) -> torch.Tensor:
    """[n, D + 1] per anchor of a [n, D] with log-sum-exp lse [n]: over these candidates, sum_j P_ij k_j and
    sum_j P_ij s_ij (P: the softmax), which add up over disjoint candidate sets.  fused: each run's by the Triton
    kernels."""
    pull = a.new_zeros(len(a), a.shape[1] + 1)
    if fused:
        from fne_kernels import triton_pull_partials

        for run in runs:
            pull += triton_pull_partials(a, scale, lse, run, anchor_ids, coefficients)
        return pull
    for keys, ids, _, valid in _tiles(runs, tile):
        prob, tile_sim = compiled_step("infonce_backward", backward_tile, a @ keys.T, lse, scale, coefficients,
                                       anchor_ids, ids, valid)
        pull[:, :-1] += prob @ keys
        pull[:, -1] += tile_sim
    return pull


def infonce_gradients(grad_loss, t, pos_keys, pos, p_pos, pull, pull_sim) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 gradient of the anchors [b, D], of the logit scale, shaped as t) from the second pass's sums: pull [b, D]
    = sum_j P_ij k_j, pull_sim [b] = sum_j P_ij s_ij, p_pos [b] = the positive's softmax probability P_i0, pos [b]
    the positive similarities."""
    g = grad_loss.float()
    # dL_i/da_i = t ((P_i0 - 1) k+_i + sum_j P_ij k_j);  dL_i/dt = (P_i0 - 1) p_i + sum_j P_ij s_ij
    grad_anchors = (g * t)[:, None] * ((p_pos - 1)[:, None] * pos_keys.float() + pull)
    grad_scale = (g * ((p_pos - 1) * pos + pull_sim)).sum().reshape(t.shape)
    return grad_anchors, grad_scale


def _to_owners(t: torch.Tensor, b: int) -> torch.Tensor:
    """Rows of all G anchors -> [world, b, ...]: the rows of this rank's anchors from every rank (all-to-all)."""
    return all_to_all(t).view(world_size(), b, *t.shape[1:])


class _PosteriorInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, scale, pos_keys, runs, anchor_ids, anchor_labels, stats, cfg, tile, sharded, fused):
        a = anchors.detach().float()
        t = scale.detach().float()
        coefficients = log_odds_coefficients(stats, cfg, a.device)
        pos = (a * pos_keys.float()).sum(1)
        every = all_gather_cat(a) if sharded else a  # the anchors this rank's candidates are read against
        partials = lse_partials(every, t, runs, anchor_ids, anchor_labels, coefficients, tile, fused)
        partials = _to_owners(partials, len(a)) if sharded else partials[None]
        lse, false_prob = combine_partials(pos * t, partials)
        ctx.save_for_backward(a, every, t, pos_keys, pos, lse, anchor_ids, coefficients)
        ctx.runs, ctx.tile, ctx.sharded, ctx.fused, ctx.dtype = runs, tile, sharded, fused, anchors.dtype
        ctx.mark_non_differentiable(false_prob)
        return lse - pos * t, false_prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_false_prob):
        a, every, t, pos_keys, pos, lse, anchor_ids, coefficients = ctx.saved_tensors
        if ctx.sharded:
            pulls = _to_owners(pull_partials(every, t, all_gather_cat(lse), ctx.runs, anchor_ids, coefficients,
                                             ctx.tile, ctx.fused), len(a)).sum(0)
        else:
            pulls = pull_partials(a, t, lse, ctx.runs, anchor_ids, coefficients, ctx.tile, ctx.fused)
        grad_anchors, grad_scale = infonce_gradients(grad_loss, t, pos_keys, pos, (pos * t - lse).exp(),
                                                     pulls[:, :-1], pulls[:, -1])
        return grad_anchors.to(ctx.dtype), grad_scale, *(None,) * 9


def _fused(impl: str, anchors: torch.Tensor) -> bool:
    """Whether the Triton kernels give the partials: impl "triton", or "auto" on CUDA (every run, one process or
    sharded); else the torch tiles."""
    if impl not in IMPLS:
        raise ValueError(f"posterior_infonce impl={impl!r} is unknown: use one of {IMPLS}")
    return impl == "triton" or (impl == "auto" and anchors.is_cuda)


def streamed_posterior_infonce(anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor,
                               runs: list[Candidates], anchor_ids: torch.Tensor, anchor_labels: torch.Tensor,
                               stats: SimilarityStats, cfg: FNEConfig, *, sharded: bool = False,
                               tile_size: int | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses [b] of this rank's anchors [b, D] (gradient into them and into the 0-dim or 1-element logit
    `scale`) and, per row, the softmax probability that falls on labelled false negatives [b] (no gradient; the
    row's whole negative mass is 1 - exp(-loss)).  pos_keys [b, D]: the anchors' own momentum keys.

    runs: the candidates, read in place.  sharded=False: they are all candidates, and anchor_ids, anchor_labels
    are the b anchors'.  sharded=True (collective; every rank calls it with the same b and scale): they are this
    rank's share of the candidates (possibly none), disjoint across ranks, and anchor_ids, anchor_labels are the
    G = world x b anchors' of all ranks in rank order (the global batch's).  Memory O(n x tile_size) besides the
    runs (n = b, or G sharded), for any number of candidates.

    `impl`: "torch" (the streaming tiles, the reference), "triton" (the fused kernels, fne_kernels.fne_infonce,
    for every run: the product in the keys' dtype, fp32 accumulation; `tile_size` is the torch path's only), "auto"
    (triton for CUDA tensors, torch otherwise); "dense" (fne.impl's dense sampler) runs the torch path: this loss
    never holds [b, N].
    """
    fused = _fused(impl, anchors)
    n = len(anchor_ids)
    tile = tile_size or max(1, DEFAULT_TILE_ELEMENTS // max(n, 1))
    return _PosteriorInfoNCE.apply(anchors, scale, pos_keys.detach(), runs, anchor_ids, anchor_labels, stats, cfg,
                                   tile, sharded, fused)


def posterior_infonce(anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor, cand: CandidateSet,
                      stats: SimilarityStats, cfg: FNEConfig, tile_size: int | None = None, impl: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`streamed_posterior_infonce` over one candidate set (one process; `impl` as there, the fused kernels on
    CUDA): per-row losses [b] and false-negative softmax mass [b]; memory O(b * tile_size) for any number of
    candidates (the kernels: O(b x D) per candidate split)."""
    run = Candidates(cand.keys, cand.key_ids, cand.key_labels, cand.valid)
    return streamed_posterior_infonce(anchors, scale, pos_keys, [run], cand.anchor_ids, cand.anchor_labels, stats,
                                      cfg, tile_size=tile_size, impl=impl)


def dense_posterior_infonce(anchors, scale, pos_keys, cand: CandidateSet, stats, cfg) -> torch.Tensor:
    """The reference: the whole [b, N] logit matrix and autograd; per-row losses [b]."""
    s = anchors.float() @ cand.keys.float().T
    drop = (cand.anchor_ids[:, None] == cand.key_ids[None, :]) | ~cand.valid[None, :]
    log_w = true_negative_prob(s.detach(), stats, cfg).log()
    logits = (s * scale + log_w).masked_fill(drop, float("-inf"))
    pos = (anchors.float() * pos_keys.float().detach()).sum(1, keepdim=True) * scale
    return -torch.cat([pos, logits], 1).log_softmax(1)[:, 0]
