"""Negative samplers in torch: the dense reference and the streaming form of FNE_SPEC.

The streaming form never materialises [B, N]: it walks over tiles of candidates, keeping per anchor the
minimum of an exponential race key E/w (which is exactly a draw from w / sum(w) for any tiling) and the
running maximum of the fallback score (the hardest violator).  Its uniforms come from `fne_dist.rng`, keyed on
(seed, step, direction, global row, global column), so the draw does not depend on the tile size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist import rng
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, fallback_scores, fne_weights

DEFAULT_TILE_ELEMENTS = 1 << 22  # [B, tile] fp32 temporaries of 16 MiB


@dataclass
class SampleResult:
    """index [B] long: chosen candidate column; fallback [B] bool: the row had no positive weight and took
    its hardest violator (see `fallback_scores`); survivors [B] long: candidates with positive weight; weight_sum [B] fp32."""

    index: torch.Tensor
    fallback: torch.Tensor
    survivors: torch.Tensor
    weight_sum: torch.Tensor


def dense_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                 seed: int, valid=None) -> SampleResult:
    """The reference: the whole [B, N] weight matrix, then torch.multinomial (seeded by `seed`)."""
    sims = anchors.float() @ keys.float().T
    pos_mask = anchor_ids[:, None] == key_ids[None, :]
    w = fne_weights(sims, pos_sims, pos_mask, stats, cfg, valid)
    weight_sum = w.sum(1)
    fallback = weight_sum == 0
    hardest = fallback_scores(sims, pos_mask, valid).argmax(1)
    generator = torch.Generator(device=w.device).manual_seed(seed)
    drawn = torch.multinomial(w.masked_fill(fallback[:, None], 1.0), 1, generator=generator).squeeze(1)
    return SampleResult(torch.where(fallback, hardest, drawn), fallback, (w > 0).sum(1), weight_sum)


def streaming_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                     stream: int, row_offset: int = 0, valid=None, tile_size: int | None = None) -> SampleResult:
    """The streaming form in torch (CPU or GPU); memory O(B * tile_size)."""
    b, n = anchors.shape[0], keys.shape[0]
    device = anchors.device
    tile = tile_size or max(1, min(n, DEFAULT_TILE_ELEMENTS // max(b, 1)))
    a = anchors.float()
    row_bits = rng.row_hash(stream, torch.arange(b, device=device) + row_offset)
    best_key = torch.full((b,), float("inf"), device=device)
    best_index = torch.zeros(b, dtype=torch.long, device=device)
    worst_cost = torch.full((b,), float("-inf"), device=device)
    worst_index = torch.zeros(b, dtype=torch.long, device=device)
    survivors = torch.zeros(b, dtype=torch.long, device=device)
    weight_sum = torch.zeros(b, device=device)
    for start in range(0, n, tile):
        cols = torch.arange(start, min(start + tile, n), device=device)
        sims = a @ keys[start:start + tile].float().T
        pos_mask = anchor_ids[:, None] == key_ids[None, start:start + tile]
        tile_valid = None if valid is None else valid[start:start + tile]
        w = fne_weights(sims, pos_sims, pos_mask, stats, cfg, tile_valid)
        survivors += (w > 0).sum(1)
        weight_sum += w.sum(1)
        u = rng.uniform_from_hashes(row_bits, rng.col_hash(stream, cols))
        race = torch.log(u).neg_().div_(w)  # w = 0 gives +inf: never drawn
        key, arg = race.min(1)
        take = key < best_key
        best_key = torch.where(take, key, best_key)
        best_index = torch.where(take, arg + start, best_index)
        cost, carg = fallback_scores(sims, pos_mask, tile_valid).max(1)
        take = cost > worst_cost
        worst_cost = torch.where(take, cost, worst_cost)
        worst_index = torch.where(take, carg + start, worst_index)
    fallback = weight_sum == 0
    return SampleResult(torch.where(fallback, worst_index, best_index), fallback, survivors, weight_sum)
