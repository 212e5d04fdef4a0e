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


def no_candidates(b: int, device) -> SampleResult:
    """The draw over no candidates (a rank whose shard is empty, an empty queue): no negative, and the partials
    that leave a merge unchanged."""
    none = torch.full((b,), NO_NEGATIVE, dtype=torch.long, device=device)
    inf = torch.full((b,), float("inf"), device=device)
    return SampleResult(none, torch.zeros(b, dtype=torch.bool, device=device), torch.zeros_like(none),
                        torch.zeros(b, device=device), inf, -inf, none)


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


def tile_draw(sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats: SimilarityStats, cfg: FNEConfig, stream,
              rows, first_col):
    """One tile's part of the two-level draw (`sims` [B, T], its first block at global column `first_col`; `stream`
    an int or its `rng.stream_tensor`, as a compiled step takes it; K streams: sims, pos_sims and anchor_ids hold
    K * len(rows) rows, those of each stream in turn, as `rng.block_bits`): per row the block race's smallest key
    -log(u) / W_b (+inf where the tile has no weight) and the column within the tile drawn inside that block, the
    survivors, the weight sum and the best fallback score.  Across tiles the smallest key wins (`streaming_sample`),
    and the column drawn in the winning block is the one a draw over all tiles at once would pick."""
    blocks, block_w, survivors, score = tile_stats(sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats, cfg)
    b, n_blocks = block_w.shape
    starts = torch.arange(0, n_blocks * SAMPLE_BLOCK, SAMPLE_BLOCK, device=sims.device)
    u_race, u_pick = rng.block_uniforms(stream, rows, starts + first_col)
    key, arg = u_race.log_().neg_().div_(block_w).min(1)
    row_block = torch.arange(b, device=sims.device) * n_blocks + arg  # a flat row gather: ~100x faster than [at, arg]
    chosen = blocks.reshape(b * n_blocks, SAMPLE_BLOCK)[row_block]
    column = arg * SAMPLE_BLOCK + pick_in_block(chosen, u_pick.flatten()[row_block])
    return key, column, survivors, block_w.sum(1), score


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


_COMPILED = {}  # the compiled tile steps by name ("tile_draw", ...); None once compiling failed


def compiled_step(name: str, step, sims, *args, compile: bool | None = None):
    """`step(sims, *args)`, compiled into one fused loop on the CPU: eager, the ~50 small operations of a tile step
    (the sampler's `tile_draw`, the posterior InfoNCE's) cost several times the matmul; compiled, less than it, with
    the same results up to float rounding.  `compile` None: large tiles only (COMPILE_MIN_ELEMENTS and more); small
    ones (tests, small batches) stay eager: compiling costs 7-13 s once per process and step on a 2-core box
    (Inductor caches it on disk), which a [64, 8192] tile (12 -> 3 ms a call) repays within a few thousand calls,
    and a draw whose candidates reach the size passes True for its small in-batch tile too (a [64, 64] tile step
    0.49 -> 0.09 ms).  Where compiling fails, eager it is, with a warning."""
    if compile is None:
        compile = sims.numel() >= COMPILE_MIN_ELEMENTS
    if sims.device.type == "cpu" and compile:
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


def dense_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                 stream: int, row_offset: int = 0, col_offset: int = 0, valid=None) -> SampleResult:
    """The reference: the whole [B, N] weight matrix, then one two-level draw over all of it."""
    sims = anchors.float() @ keys.float().T
    rows = torch.arange(len(anchors), device=sims.device) + row_offset
    key, column, survivors, weight_sum, worst_score = tile_draw(sims, pos_sims, anchor_ids, key_ids, valid, stats,
                                                                cfg, stream, rows, col_offset)
    worst = hardest_columns(sims, anchor_ids, key_ids, valid)
    return finish(key, column + col_offset, worst_score, worst + col_offset, survivors, weight_sum, cfg)


def streaming_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                     stream: int | Sequence[int], row_offset: int = 0, col_offset: int = 0, valid=None,
                     tile_size: int | None = None, compile: bool | None = None) -> SampleResult:
    """The streaming form in torch (CPU or GPU); memory O(B * tile_size).  The tile (default: DEFAULT_TILE_ELEMENTS
    on the CPU, GPU_TILE_ELEMENTS on a GPU) is rounded up to a multiple of SAMPLE_BLOCK.  Each tile draws inside its
    own race winner, so the draw needs no second pass over the candidates.  `compile`: see `compiled_step`.

    Several directions in one pass (`fne.sample_negatives`): anchors [K, B, D], keys a sequence of K [N, D],
    pos_sims [K, B], K streams; each tile step then runs once over the K * B rows, and the result's fields are
    [K, B], the draws of K calls."""
    several = anchors.dim() == 3
    if not several:
        anchors, keys, pos_sims, stream = anchors[None], (keys,), pos_sims[None], (stream,)
    k, b, n = anchors.shape[0], anchors.shape[1], key_ids.shape[0]
    device = anchors.device
    if n == 0:
        result = no_candidates(k * b, device)
    else:
        result = _stream_tiles(anchors.float(), keys, pos_sims.reshape(k * b), anchor_ids.repeat(k), key_ids, stats,
                               cfg, rng.stream_tensor(*stream), row_offset, col_offset, valid, tile_size, compile)
    return result.map(lambda t: t.view(k, b)) if several else result


def _stream_tiles(a, keys, pos_sims, anchor_ids, key_ids, stats, cfg, words, row_offset, col_offset, valid, tile_size,
                  compile) -> SampleResult:
    """`streaming_sample`'s tiles over the rows of every direction (a [K, B, D], fp32; pos_sims and anchor_ids
    [K * B]): fields [K * B]."""
    k, b, n = a.shape[0], a.shape[1], key_ids.shape[0]
    device = a.device
    elements = DEFAULT_TILE_ELEMENTS if device.type == "cpu" else GPU_TILE_ELEMENTS
    tile = tile_size or max(1, min(n, elements // max(k * b, 1)))
    tile = -(-tile // SAMPLE_BLOCK) * SAMPLE_BLOCK
    rows = torch.arange(b, device=device) + row_offset
    for start in range(0, n, tile):
        stop = min(start + tile, n)
        sims = torch.empty(k * b, stop - start, device=device)
        for d in range(k):  # each direction's product into its rows: one tile step for all
            torch.mm(a[d], keys[d][start:stop].float().T, out=sims[d * b:(d + 1) * b])
        tile_valid = None if valid is None else valid[start:stop]
        tile_ids = key_ids[start:stop]
        first_col = start + col_offset
        key, column, tile_survivors, tile_weight, score = compiled_step(
            "tile_draw", tile_draw, sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats, cfg, words, rows,
            torch.tensor(first_col), compile=compile)  # CPU scalars: no recompile, no copy
        if start == 0:  # the first tile's results are the running ones (most calls have one tile)
            best_key, best_index, survivors, weight_sum = key, column + first_col, tile_survivors, tile_weight
            worst_score, rose = score, score > float("-inf")
            worst_index = torch.full((k * b,), NO_NEGATIVE, dtype=torch.long, device=device)
        else:
            survivors = survivors + tile_survivors
            weight_sum = weight_sum + tile_weight
            take = key < best_key
            best_key = torch.where(take, key, best_key)
            best_index = torch.where(take, column + first_col, best_index)
            rose = score > worst_score
            worst_score = torch.where(rose, score, worst_score)
        # a row with weight never reads its fallback column (`finish`), and a row that ends without weight had none
        # at the tile of its best score either: the column is needed only where the best score rose, weightless
        worst_index = fallback_columns(worst_index, rose & (weight_sum == 0), sims, anchor_ids, tile_ids, tile_valid,
                                       first_col)
    return finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg)
