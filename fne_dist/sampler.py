"""Negative samplers in torch: the dense reference and the streaming form of FNE_SPEC.

Both draw by an exponential race: per anchor the candidate with the smallest key E/w, E = -log(u), wins, which is
exactly a draw from w / sum(w).  The uniforms come from `fne_dist.rng`, keyed on (seed, step, direction, global
row, global column), so the draw does not depend on the tile size, on how anchors are split across ranks, or on
how the candidates are split into parts: results for disjoint parts (segments of [batch ; queue], rank shards)
combine exactly with `merge_samples` (the smallest key wins).  The dense path builds the whole [B, N] weight
matrix; the streaming path never does (memory O(B * tile)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fne_dist import rng
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, fallback_scores, fne_weights

DEFAULT_TILE_ELEMENTS = 1 << 22  # [B, tile] fp32 temporaries of 16 MiB
SAMPLE_BLOCK = 128  # columns per sampling block (two-level sampler); callers cut candidate parts at multiples of it
NO_NEGATIVE = -1  # `SampleResult.index` of a row that gets no negative


@dataclass
class SampleResult:
    """Per anchor row [B]: index (long, global candidate column; NO_NEGATIVE where the row gets no negative: in
    eliminate mode when every weight is 0, in any mode when no valid non-positive candidate exists), fallback (bool:
    the row had no positive weight and took its hardest candidate, see `fallback_scores`), survivors (long:
    candidates with positive weight), weight_sum (fp32), race_key (fp32: the winner's race key, +inf where the
    weight sum is 0), fallback_score (fp32: the best fallback score, -inf where no candidate qualifies) and
    fallback_index (its global column).  The last three let `merge_samples` combine results over disjoint candidate
    sets exactly."""

    index: torch.Tensor
    fallback: torch.Tensor
    survivors: torch.Tensor
    weight_sum: torch.Tensor
    race_key: torch.Tensor | None = None
    fallback_score: torch.Tensor | None = None
    fallback_index: torch.Tensor | None = None  # the best fallback column (global)

    @property
    def has_negative(self) -> torch.Tensor:
        return self.index != NO_NEGATIVE


def finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg: FNEConfig) -> SampleResult:
    """The result from a row's race winner and fallback candidate: the race where any weight is positive, else the
    fallback (never in eliminate mode), else no negative."""
    drawn = weight_sum > 0
    fallback = ~drawn & torch.isfinite(worst_score) if cfg.mode != "eliminate" else torch.zeros_like(drawn)
    none = torch.full_like(best_index, NO_NEGATIVE)
    index = torch.where(drawn, best_index, torch.where(fallback, worst_index, none))
    return SampleResult(index, fallback, survivors, weight_sum, best_key, worst_score, worst_index)


def merge_samples(parts: Sequence[SampleResult], cfg: FNEConfig) -> SampleResult:
    """Combine results over disjoint candidate sets (in any order) into the result over their union."""
    key = torch.stack([p.race_key for p in parts])
    # where a part's weight sum is positive its index is its race winner; elsewhere its key is +inf
    idx = torch.stack([p.index.where(p.weight_sum > 0, torch.iinfo(torch.long).max) for p in parts])
    # smallest key, ties to the lowest global column: order by (key, column) lexicographically
    best_key = key.min(0).values
    best_index = idx.masked_fill(key != best_key, torch.iinfo(torch.long).max).min(0).values
    score = torch.stack([p.fallback_score for p in parts])
    fidx = torch.stack([p.fallback_index for p in parts])
    worst_score = score.max(0).values
    worst_index = fidx.masked_fill(score != worst_score, torch.iinfo(torch.long).max).min(0).values
    survivors = torch.stack([p.survivors for p in parts]).sum(0)
    weight_sum = torch.stack([p.weight_sum for p in parts]).sum(0)
    return finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg)


def _race_tile(w, stream, row_bits, cols):
    """Each row's smallest race key -log(u)/w over one tile of columns, and its column (w = 0 never wins)."""
    u = rng.uniform_from_hashes(row_bits, rng.col_hash(stream, cols))
    return torch.log(u).neg_().div_(w).min(1)


def dense_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                 stream: int, row_offset: int = 0, col_offset: int = 0, valid=None) -> SampleResult:
    """The reference: the whole [B, N] weight matrix, then one race over all of it."""
    sims = anchors.float() @ keys.float().T
    pos_mask = anchor_ids[:, None] == key_ids[None, :]
    w = fne_weights(sims, pos_sims, pos_mask, stats, cfg, valid)
    rows = torch.arange(len(anchors), device=w.device) + row_offset
    cols = torch.arange(keys.shape[0], device=w.device) + col_offset
    best_key, best = _race_tile(w, stream, rng.row_hash(stream, rows), cols)
    worst_score, worst = fallback_scores(sims, pos_mask, valid).max(1)
    return finish(best_key, best + col_offset, worst_score, worst + col_offset, (w > 0).sum(1), w.sum(1), cfg)


def streaming_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                     stream: int, row_offset: int = 0, col_offset: int = 0, valid=None,
                     tile_size: int | None = None) -> SampleResult:
    """The streaming form in torch (CPU or GPU); memory O(B * tile_size)."""
    b, n = anchors.shape[0], keys.shape[0]
    device = anchors.device
    tile = tile_size or max(1, min(n, DEFAULT_TILE_ELEMENTS // max(b, 1)))
    a = anchors.float()
    row_bits = rng.row_hash(stream, torch.arange(b, device=device) + row_offset)
    best_key = torch.full((b,), float("inf"), device=device)
    best_index = torch.zeros(b, dtype=torch.long, device=device)
    worst_score = torch.full((b,), float("-inf"), device=device)
    worst_index = torch.zeros(b, dtype=torch.long, device=device)
    survivors = torch.zeros(b, dtype=torch.long, device=device)
    weight_sum = torch.zeros(b, device=device)
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        sims = a @ keys[start:stop].float().T
        pos_mask = anchor_ids[:, None] == key_ids[None, start:stop]
        tile_valid = None if valid is None else valid[start:stop]
        w = fne_weights(sims, pos_sims, pos_mask, stats, cfg, tile_valid)
        survivors += (w > 0).sum(1)
        weight_sum += w.sum(1)
        key, arg = _race_tile(w, stream, row_bits, torch.arange(start, stop, device=device) + col_offset)
        take = key < best_key
        best_key = torch.where(take, key, best_key)
        best_index = torch.where(take, arg + start + col_offset, best_index)
        score, sarg = fallback_scores(sims, pos_mask, tile_valid).max(1)
        take = score > worst_score
        worst_score = torch.where(take, score, worst_score)
        worst_index = torch.where(take, sarg + start + col_offset, worst_index)
    return finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg)
