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
  forward: each set gives per anchor a partial log-sum-exp, (running max m, sum of exp(logit - m), the same sum
    over labelled false negatives) [n, 3]; `combine_partials` joins them with the positive's logit;
  backward: each set gives per anchor its share of sum_j P_ij k_j and of sum_j P_ij s_ij [n, D + 1], which add.
Sharded (the sharded buffer, `fne_dist.buffer`), every rank holds one such set: the anchors are all-gathered, each
rank computes the partials of all G anchors over its shard, and an all-to-all sends each anchor's world partials
to its rank, which combines them; the backward all-gathers the G log-sum-exps, each rank computes its shard's
gradient partials for all G anchors and an all-to-all sends them back the same way.  Traffic per rank and
direction: G x D (anchors) + 3 G (partials) forward, G + G x (D + 1) backward: O(G x D), independent of the buffer.
`dense_posterior_infonce` is the autograd reference the tests compare with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.distributed import all_gather_cat, all_to_all, world_size
from fne_dist.losses import false_negative_mask
from fne_dist.sampler import DEFAULT_TILE_ELEMENTS
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, true_negative_prob


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


def _tile_logits(a, scale, run: Candidates, anchor_ids, start: int, stop: int, stats, cfg):
    """(logits t s + log(1 - f), -inf off the candidate set; similarities s; the mask off the set) of one tile."""
    s = a @ run.keys[start:stop].float().T
    drop = anchor_ids[:, None] == run.ids[None, start:stop]
    if run.valid is not None:
        drop |= ~run.valid[None, start:stop]
    logits = (s * scale).add_(true_negative_prob(s, stats, cfg).log_()).masked_fill_(drop, float("-inf"))
    return logits, s, drop


def _tiles(runs: list[Candidates], tile: int):
    for run in runs:
        for start in range(0, len(run.ids), tile):
            yield run, start, start + tile


def lse_partials(a, scale, runs: list[Candidates], anchor_ids, anchor_labels, stats, cfg, tile: int) -> torch.Tensor:
    """[n, 3] per anchor of a [n, D] over these candidates: the running max m of its logits (-inf: none), the sum
    of exp(logit - m) and the same sum over labelled false negatives (0, 0 where there is none)."""
    m = torch.full((len(a),), float("-inf"), device=a.device)
    total, false_mass = torch.zeros_like(m), torch.zeros_like(m)
    for run, start, stop in _tiles(runs, tile):
        logits, _, drop = _tile_logits(a, scale, run, anchor_ids, start, stop, stats, cfg)
        false_neg = ~drop & false_negative_mask(anchor_ids[:, None], anchor_labels[:, None], run.ids[None, start:stop],
                                                run.labels[None, start:stop])
        m_new = torch.maximum(m, logits.max(1).values)
        ref = m_new.masked_fill(m_new == float("-inf"), 0)  # a finite reference: exp(-inf - ref) = 0, never nan
        rescale = (m - ref).exp()
        e = (logits - ref[:, None]).exp_()
        total = total * rescale + e.sum(1)
        false_mass = false_mass * rescale + (e * false_neg).sum(1)
        m = m_new
    return torch.stack([m, total, false_mass], 1)


def combine_partials(pos_logit: torch.Tensor, partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp over the positive (logit [n]) and every candidate, and the softmax mass on labelled false
    negatives [n], from the partials [k, n, 3] of k disjoint candidate sets (exact: a shift of references)."""
    m = torch.maximum(pos_logit, partials[..., 0].max(0).values)
    weight = (partials[..., 0] - m).exp()  # 0 for a set without candidates (m = -inf)
    total = (pos_logit - m).exp() + (partials[..., 1] * weight).sum(0)
    return m + total.log(), (partials[..., 2] * weight).sum(0) / total


def pull_partials(a, scale, lse, runs: list[Candidates], anchor_ids, stats, cfg, tile: int) -> torch.Tensor:
    """[n, D + 1] per anchor of a [n, D] with log-sum-exp lse [n]: over these candidates, sum_j P_ij k_j and
    sum_j P_ij s_ij (P: the softmax), which add up over disjoint candidate sets."""
    pull = a.new_zeros(len(a), a.shape[1] + 1)
    for run, start, stop in _tiles(runs, tile):
        logits, s, _ = _tile_logits(a, scale, run, anchor_ids, start, stop, stats, cfg)
        prob = (logits - lse[:, None]).exp_()
        pull[:, :-1] += prob @ run.keys[start:stop].float()
        pull[:, -1] += (prob * s).sum(1)
    return pull


def _to_owners(t: torch.Tensor, b: int) -> torch.Tensor:
    """Rows of all G anchors -> [world, b, ...]: the rows of this rank's anchors from every rank (all-to-all)."""
    return all_to_all(t).view(world_size(), b, *t.shape[1:])


class _PosteriorInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, scale, pos_keys, runs, anchor_ids, anchor_labels, stats, cfg, tile, sharded):
        a = anchors.detach().float()
        t = scale.detach().float()
        pos = (a * pos_keys.float()).sum(1)
        every = all_gather_cat(a) if sharded else a  # the anchors this rank's candidates are read against
        partials = lse_partials(every, t, runs, anchor_ids, anchor_labels, stats, cfg, tile)
        partials = _to_owners(partials, len(a)) if sharded else partials[None]
        lse, false_prob = combine_partials(pos * t, partials)
        ctx.save_for_backward(a, every, t, pos_keys, pos, lse, anchor_ids)
        ctx.runs, ctx.stats, ctx.cfg, ctx.tile, ctx.sharded, ctx.dtype = runs, stats, cfg, tile, sharded, anchors.dtype
        ctx.mark_non_differentiable(false_prob)
        return lse - pos * t, false_prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_false_prob):
        a, every, t, pos_keys, pos, lse, anchor_ids = ctx.saved_tensors
        if ctx.sharded:
            pulls = _to_owners(pull_partials(every, t, all_gather_cat(lse), ctx.runs, anchor_ids, ctx.stats,
                                             ctx.cfg, ctx.tile), len(a)).sum(0)
        else:
            pulls = pull_partials(a, t, lse, ctx.runs, anchor_ids, ctx.stats, ctx.cfg, ctx.tile)
        pull, pull_sim = pulls[:, :-1], pulls[:, -1]  # sum_j P_ij k_j, sum_j P_ij s_ij
        p_pos = (pos * t - lse).exp()
        g = grad_loss.float()
        # dL_i/da_i = t ((P_i0 - 1) k+_i + sum_j P_ij k_j);  dL_i/dt = (P_i0 - 1) p_i + sum_j P_ij s_ij
        grad_anchors = (g * t)[:, None] * ((p_pos - 1)[:, None] * pos_keys.float() + pull)
        grad_scale = (g * ((p_pos - 1) * pos + pull_sim)).sum().reshape(t.shape)
        return grad_anchors.to(ctx.dtype), grad_scale, *(None,) * 8


def streamed_posterior_infonce(anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor,
                               runs: list[Candidates], anchor_ids: torch.Tensor, anchor_labels: torch.Tensor,
                               stats: SimilarityStats, cfg: FNEConfig, *, sharded: bool = False,
                               tile_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses [b] of this rank's anchors [b, D] (gradient into them and into the 0-dim or 1-element logit
    `scale`) and, per row, the softmax probability that falls on labelled false negatives [b] (no gradient; the
    row's whole negative mass is 1 - exp(-loss)).  pos_keys [b, D]: the anchors' own momentum keys.

    runs: the candidates, read in place.  sharded=False: they are all candidates, and anchor_ids, anchor_labels
    are the b anchors'.  sharded=True (collective; every rank calls it with the same b and scale): they are this
    rank's share of the candidates (possibly none), disjoint across ranks, and anchor_ids, anchor_labels are the
    G = world x b anchors' of all ranks in rank order (the global batch's).  Memory O(n x tile_size) besides the
    runs (n = b, or G sharded), for any number of candidates.
    """
    n = len(anchor_ids)
    tile = tile_size or max(1, DEFAULT_TILE_ELEMENTS // max(n, 1))
    return _PosteriorInfoNCE.apply(anchors, scale, pos_keys.detach(), runs, anchor_ids, anchor_labels, stats, cfg,
                                   tile, sharded)


def posterior_infonce(anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor, cand: CandidateSet,
                      stats: SimilarityStats, cfg: FNEConfig, tile_size: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`streamed_posterior_infonce` over one candidate set (one process): per-row losses [b] and false-negative
    softmax mass [b]; memory O(b * tile_size) for any number of candidates."""
    run = Candidates(cand.keys, cand.key_ids, cand.key_labels, cand.valid)
    return streamed_posterior_infonce(anchors, scale, pos_keys, [run], cand.anchor_ids, cand.anchor_labels, stats,
                                      cfg, tile_size=tile_size)


def dense_posterior_infonce(anchors, scale, pos_keys, cand: CandidateSet, stats, cfg) -> torch.Tensor:
    """The reference: the whole [b, N] logit matrix and autograd; per-row losses [b]."""
    s = anchors.float() @ cand.keys.float().T
    drop = (cand.anchor_ids[:, None] == cand.key_ids[None, :]) | ~cand.valid[None, :]
    log_w = true_negative_prob(s.detach(), stats, cfg).log()
    logits = (s * scale + log_w).masked_fill(drop, float("-inf"))
    pos = (anchors.float() * pos_keys.float().detach()).sum(1, keepdim=True) * scale
    return -torch.cat([pos, logits], 1).log_softmax(1)[:, 0]
