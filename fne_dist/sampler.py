"""Negative samplers in torch: the dense reference and the streaming form of FNE_SPEC, both two-level.

Two-level exact sampling.  Each call's candidate columns are cut into blocks of SAMPLE_BLOCK columns counted from
its first column (`col_offset`).  A row first races its blocks: block b, of weight W_b (the sum of its weights),
gets the key E_b / W_b with E_b = -log(u_b) exponential, and the smallest key wins, which is exactly a draw of
block b with probability W_b / W.  Inside the winning block a second uniform v picks by inverse CDF the first
column whose running weight sum exceeds v * W_b, with probability w_j / W_b.  Together: w_j / W, exactly.  The two
uniforms come from `fne_dist.rng`, keyed on (seed, step, direction, global row, the block's global first column),
so the draw does not depend on the tile size (a multiple of SAMPLE_BLOCK), on how anchors are split across ranks,
or on how the candidates are split into parts cut at multiples of SAMPLE_BLOCK: results for such parts (segments,
rank shards) combine exactly with `merge_samples` (the smallest race key wins).  The dense path builds the whole
[B, N] weight matrix; the streaming path never does (memory O(B * tile)).  The Triton kernel draws the same way.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from fne_dist import rng
from fne_dist.sample_result import NO_NEGATIVE, SAMPLE_BLOCK, SampleResult
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, fallback_scores, fne_weights

DEFAULT_TILE_ELEMENTS = 1 << 22  # [B, tile] fp32 temporaries of 16 MiB
GPU_TILE_ELEMENTS = 1 << 26  # on a GPU, 256 MiB temporaries: few tiles, few kernel launches
COMPILE_MIN_ELEMENTS = 1 << 19  # CPU tiles from this size run the compiled tile step (fused loops, 3-4x eager)

__all__ = ["SampleResult", "SAMPLE_BLOCK", "NO_NEGATIVE", "dense_sample", "streaming_sample", "merge_samples"]


def finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg: FNEConfig) -> SampleResult:
    """The result from a row's race winner and fallback candidate: the race where any weight is positive, else the
    fallback (never in eliminate mode), else no negative."""
    drawn = weight_sum > 0
    needs_fallback = ~drawn & torch.isfinite(worst_score)
    fallback = needs_fallback if cfg.mode != "eliminate" else torch.zeros_like(drawn)
    none = torch.full_like(best_index, NO_NEGATIVE)
    index = torch.where(drawn, best_index, torch.where(fallback, worst_index, none))
    return SampleResult(index, fallback, survivors, weight_sum, best_key, worst_score,
                        torch.where(needs_fallback, worst_index, none))


def merge_samples(parts: Sequence[SampleResult], cfg: FNEConfig) -> SampleResult:
    """Combine results over disjoint candidate sets (in any order) into the result over their union.  Exact for the
    two-level draw when every sampling block lies in one part: a part's race key is its winning block's key."""
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


def race_blocks(blocks: torch.Tensor, block_w: torch.Tensor, stream: int, rows: torch.Tensor, first_col: int):
    """The block race over one tile: `blocks` [B, n_blocks, SAMPLE_BLOCK] its weights, `block_w` [B, n_blocks] their
    sums, the first block starting at global column `first_col`.  Per row the smallest key -log(u) / W_b (+inf
    where the tile has no weight), its block's first column within the tile, the block's weights and its pick
    uniform."""
    starts = torch.arange(0, blocks.shape[1] * SAMPLE_BLOCK, SAMPLE_BLOCK, device=blocks.device)
    u_race, u_pick = rng.block_uniforms(stream, rows, starts + first_col)
    key, arg = u_race.log_().neg_().div_(block_w).min(1)
    b, n_blocks = block_w.shape
    row_block = torch.arange(b, device=blocks.device) * n_blocks + arg  # a flat row gather: ~100x faster than [at, arg]
    return key, arg * SAMPLE_BLOCK, blocks.reshape(b * n_blocks, SAMPLE_BLOCK)[row_block], u_pick.flatten()[row_block]


def pick_in_block(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF inside each row's block [B, SAMPLE_BLOCK]: the first column whose running weight sum exceeds
    u * (the block's total), which always has a positive weight; where rounding leaves no such column, the last
    column of positive weight.  The Triton kernel computes the same."""
    cdf = w.cumsum(1)
    first = (cdf <= u[:, None] * cdf[:, -1:]).sum(1)
    columns = torch.arange(w.shape[1], device=w.device)
    last = torch.where(w > 0, columns, -1).max(1).values
    return torch.where(first < w.shape[1], first, last)


def tile_stats(sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats: SimilarityStats, cfg: FNEConfig):
    """One tile of similarities [B, T]: its weights cut into sampling blocks [B, n_blocks, SAMPLE_BLOCK] (the last
    one padded with zeros), the block sums [B, n_blocks], and per row the survivors and the best fallback score.
    Not the score's column: an argmax costs a quarter of a compiled tile, and only rows without weight read it
    (`hardest_columns`)."""
    pos_mask = anchor_ids[:, None] == tile_ids[None, :]
    w = fne_weights(sims, pos_sims, pos_mask, stats, cfg, tile_valid)
    score = fallback_scores(sims, pos_mask, tile_valid).amax(1)
    survivors = (w > 0).sum(1)
    if w.shape[1] % SAMPLE_BLOCK:
        w = F.pad(w, (0, -w.shape[1] % SAMPLE_BLOCK))
    blocks = w.view(w.shape[0], -1, SAMPLE_BLOCK)
    return blocks, blocks.sum(2), survivors, score


def hardest_columns(sims, anchor_ids, tile_ids, tile_valid) -> torch.Tensor:
    """Each row's fallback column within the tile (the first column of its best fallback score)."""
    return fallback_scores(sims, anchor_ids[:, None] == tile_ids[None, :], tile_valid).argmax(1)


def host_reads_are_free(device: torch.device) -> bool:
    """On the CPU reading a tensor's value costs nothing; on a GPU it waits for the queued work (a host sync)."""
    return device.type == "cpu"


def fallback_columns(index, pending, sims, anchor_ids, tile_ids, tile_valid, first_col: int) -> torch.Tensor:
    """`index` [B] with the tile's fallback column (global: first_col + column) where `pending`.  On the CPU only
    the pending rows' argmaxes (rarely any); on a GPU every row's, selected, which needs no host sync."""
    if not host_reads_are_free(sims.device):
        return torch.where(pending, first_col + hardest_columns(sims, anchor_ids, tile_ids, tile_valid), index)
    rows = pending.nonzero().flatten()
    if len(rows):
        columns = hardest_columns(sims[rows], anchor_ids[rows], tile_ids, tile_valid)
        index = index.index_put((rows,), first_col + columns)
    return index


_COMPILED = {}  # the compiled tile steps by name ("tile_stats", ...); None once compiling failed


def compiled_step(name: str, step, sims, *args):
    """`step(sims, *args)`, compiled into one fused loop for large CPU tiles: eager, the ~30 elementwise passes of a
    tile step (the sampler's `tile_stats`, the posterior InfoNCE's) cost several times the matmul; compiled, less
    than it, with the same results up to float rounding.  Small tiles (tests, small batches) stay eager: compiling
    costs 7-13 s once per process and step on a 2-core box (Inductor caches it on disk), which a [64, 8192] tile
    (12 -> 3 ms a call) repays within a few thousand calls; where compiling fails, eager it is, with a warning."""
    if sims.device.type == "cpu" and sims.numel() >= COMPILE_MIN_ELEMENTS:
        if name not in _COMPILED:  # wrapped once: each torch.compile call builds a new wrapper (9 ms of CPU)
            _COMPILED[name] = torch.compile(step, dynamic=True)
        compiled = _COMPILED[name]
        if compiled is not None:
            try:
                return compiled(sims, *args)
            except Exception as error:  # no C++ compiler, an unsupported platform: the eager step is always there
                warnings.warn(f"torch.compile of the tile step {name} failed ({error!r:.200}); running it eagerly")
                _COMPILED[name] = None
    return step(sims, *args)


def _tile_stats(sims, *args):
    return compiled_step("tile_stats", tile_stats, sims, *args)


def dense_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                 stream: int, row_offset: int = 0, col_offset: int = 0, valid=None) -> SampleResult:
    """The reference: the whole [B, N] weight matrix, then one two-level draw over all of it."""
    sims = anchors.float() @ keys.float().T
    blocks, block_w, survivors, worst_score = tile_stats(sims, pos_sims, anchor_ids, key_ids, valid, stats, cfg)
    worst = hardest_columns(sims, anchor_ids, key_ids, valid)
    rows = torch.arange(len(anchors), device=sims.device) + row_offset
    best_key, start, chosen, u = race_blocks(blocks, block_w, stream, rows, col_offset)
    best = start + pick_in_block(chosen, u)
    return finish(best_key, best + col_offset, worst_score, worst + col_offset, survivors, block_w.sum(1), cfg)


def streaming_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                     stream: int, row_offset: int = 0, col_offset: int = 0, valid=None,
                     tile_size: int | None = None) -> SampleResult:
    """The streaming form in torch (CPU or GPU); memory O(B * tile_size).  The tile (default: DEFAULT_TILE_ELEMENTS
    on the CPU, GPU_TILE_ELEMENTS on a GPU) is rounded up to a multiple of SAMPLE_BLOCK.  Each tile keeps its race
    winner's block weights, so the draw inside the block needs no second pass over the candidates."""
    b, n = anchors.shape[0], keys.shape[0]
    device = anchors.device
    elements = DEFAULT_TILE_ELEMENTS if device.type == "cpu" else GPU_TILE_ELEMENTS
    tile = tile_size or max(1, min(n, elements // max(b, 1)))
    tile = -(-tile // SAMPLE_BLOCK) * SAMPLE_BLOCK
    a = anchors.float()
    rows = torch.arange(b, device=device) + row_offset
    best_key = torch.full((b,), float("inf"), device=device)
    best_start = torch.zeros(b, dtype=torch.long, device=device)
    best_w = torch.zeros(b, SAMPLE_BLOCK, device=device)
    best_u = torch.zeros(b, device=device)
    worst_score = torch.full((b,), float("-inf"), device=device)
    worst_index = torch.full((b,), NO_NEGATIVE, dtype=torch.long, device=device)
    survivors = torch.zeros(b, dtype=torch.long, device=device)
    weight_sum = torch.zeros(b, device=device)
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        sims = a @ keys[start:stop].float().T
        tile_valid = None if valid is None else valid[start:stop]
        tile_ids = key_ids[start:stop]
        blocks, block_w, tile_survivors, score = _tile_stats(sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats,
                                                             cfg)
        survivors += tile_survivors
        weight_sum += block_w.sum(1)
        key, block, chosen, u = race_blocks(blocks, block_w, stream, rows, col_offset + start)
        take = key < best_key
        best_key = torch.where(take, key, best_key)
        best_start = torch.where(take, block + start, best_start)
        best_w = torch.where(take[:, None], chosen, best_w)
        best_u = torch.where(take, u, best_u)
        take = score > worst_score
        worst_score = torch.where(take, score, worst_score)
        # a row with weight never reads its fallback column (`finish`), and a row that ends without weight had none
        # at the tile of its best score either: the column is needed only where the best score rose, weightless
        worst_index = fallback_columns(worst_index, take & (weight_sum == 0), sims, anchor_ids, tile_ids, tile_valid,
                                       start + col_offset)
    best_index = best_start + pick_in_block(best_w, best_u) + col_offset
    return finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg)
