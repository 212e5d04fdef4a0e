"""Negative samplers in torch: the dense reference and the streaming form of FNE_SPEC, both two-level.

Two-level exact sampling.  Each call's candidate columns are cut into blocks of SAMPLE_BLOCK columns counted from
its first column (`col_offset`).  A row first races its blocks: block b, of weight W_b (the sum of its weights),
gets the key E_b / W_b with E_b = -log(u_b) exponential, and the smallest key wins, which is exactly a draw of
block b with probability W_b / W.  Inside the winning block a second uniform v picks by inverse CDF the first
column whose running weight sum exceeds v * W_b, with probability w_j / W_b.  Together: w_j / W, exactly.  The two
uniforms come from `fne_dist.rng`, keyed on (seed, step, direction, global row, the block's global first column),
so the draw does not depend on the tile size (a multiple of SAMPLE_BLOCK), on how anchors are split across ranks,
or on how the candidates are split into parts cut at multiples of SAMPLE_BLOCK: results for such parts (segments,
rank shards) combine exactly with `merge_samples` (the smallest race key wins), and the streaming path reads
several parts in one pass (`KeyPart`).  The dense path builds the whole [B, N] weight matrix; the streaming path
never does (memory O(B * tile)).  The Triton kernel draws the same way.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
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

__all__ = ["SampleResult", "SAMPLE_BLOCK", "NO_NEGATIVE", "KeyPart", "dense_sample", "streaming_sample",
           "merge_samples"]


@dataclass
class KeyPart:
    """Candidates at global columns [col_offset, col_offset + n): `keys` a sequence of K [n, D] (the candidates of
    each direction drawn, read in place), ids [n], valid [n] bool or None (all valid).  A draw over several parts
    reads them as one candidate set whose sampling blocks are counted from each part's first column."""

    keys: Sequence[torch.Tensor]
    ids: torch.Tensor
    valid: torch.Tensor | None
    col_offset: int

    def __len__(self) -> int:
        return len(self.ids)


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


def no_candidates(shape: tuple[int, ...], device) -> SampleResult:
    """The draw over no candidates (a rank whose shard is empty, an empty queue) for rows of `shape` ([K, B]): no
    negative, and the partials that leave a merge unchanged."""
    none = torch.full(shape, NO_NEGATIVE, dtype=torch.long, device=device)
    inf = torch.full(shape, float("inf"), device=device)
    return SampleResult(none, torch.zeros(shape, dtype=torch.bool, device=device), torch.zeros_like(none),
                        torch.zeros(shape, device=device), inf, -inf, none)


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
              rows, tile_cols):
    """One tile's part of the two-level draw (`sims` [B, T]; `tile_cols` [T] the global column of each, whose
    every SAMPLE_BLOCK-th is a sampling block's first; `stream` an int or its `rng.stream_tensor`, as a compiled
    step takes it; K streams: sims, pos_sims and anchor_ids hold K * len(rows) rows, those of each stream in turn,
    as `rng.block_bits`): per row the block race's smallest key -log(u) / W_b (+inf where the tile has no weight)
    and the global column drawn inside that block, the survivors, the weight sum and the best fallback score.
    Across tiles the smallest key wins (`streaming_sample`), and the column drawn in the winning block is the one a
    draw over all tiles at once would pick."""
    blocks, block_w, survivors, score = tile_stats(sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats, cfg)
    b, n_blocks = block_w.shape
    u_race, u_pick = rng.block_uniforms(stream, rows, tile_cols[::SAMPLE_BLOCK])
    key, arg = u_race.log_().neg_().div_(block_w).min(1)
    row_block = torch.arange(b, device=sims.device) * n_blocks + arg  # a flat row gather: ~100x faster than [at, arg]
    chosen = blocks.reshape(b * n_blocks, SAMPLE_BLOCK)[row_block]
    column = arg * SAMPLE_BLOCK + pick_in_block(chosen, u_pick.flatten()[row_block])
    # a row without weight draws nothing (its column, -1, is never read): clamped only to stay inside the tile
    return key, tile_cols[column.clamp_(min=0)], survivors, block_w.sum(1), score


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
    valid = None if tile_valid is None else tile_valid != 0  # bool, or uint8 in a compiled step (`compiled_step`)
    w = fne_weights(sims, pos_sims, pos_mask, stats, cfg, valid)
    score = fallback_scores(sims, pos_mask, valid).amax(1)
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


def fallback_columns(index, pending, sims, anchor_ids, tile_ids, tile_valid, tile_cols) -> torch.Tensor:
    """`index` [B] with the tile's fallback column (global, through `tile_cols`) where `pending`.  On the CPU only
    the pending rows' argmaxes (rarely any); on a GPU every row's, selected, which needs no host sync."""
    if not host_reads_are_free(sims.device):
        return torch.where(pending, tile_cols[hardest_columns(sims, anchor_ids, tile_ids, tile_valid)], index)
    rows = pending.nonzero().flatten()
    if len(rows):
        columns = hardest_columns(sims[rows], anchor_ids[rows], tile_ids, tile_valid)
        index = index.index_put((rows,), tile_cols[columns])
    return index


_COMPILED = {}  # the compiled tile steps by name ("tile_draw", ...); None once compiling failed


def compiled_step(name: str, step, sims, *args, compile: bool | None = None):
    """`step(sims, *args)`, compiled into one fused loop on the CPU: eager, the ~50 small operations of a tile step
    (the sampler's `tile_draw`, the posterior InfoNCE's) cost several times the matmul; compiled, less than it, with
    the same results up to float rounding.  `compile` None: large tiles only (COMPILE_MIN_ELEMENTS and more); small
    ones (tests, small batches) stay eager: compiling costs 7-13 s once per process and step on a 2-core box
    (Inductor caches it on disk), which a [64, 8192] tile (12 -> 3 ms a call) repays within a few thousand calls,
    and a draw that reaches the size passes True for its small tiles too (`streaming_sample`).  Where compiling
    fails, eager it is, with a warning."""
    if compile is None:
        compile = sims.numel() >= COMPILE_MIN_ELEMENTS
    if sims.device.type == "cpu" and compile:
        if name not in _COMPILED:  # wrapped once: each torch.compile call builds a new wrapper (9 ms of CPU)
            _COMPILED[name] = torch.compile(step, dynamic=True)
        compiled = _COMPILED[name]
        if compiled is not None:
            try:
                return compiled(sims, *map(_as_bytes, args))
            except Exception as error:  # no C++ compiler, an unsupported platform: the eager step is always there
                warnings.warn(f"torch.compile of the tile step {name} failed ({error!r:.200}); running it eagerly")
                _COMPILED[name] = None
    return step(sims, *args)


def _as_bytes(arg):
    """A bool tensor as uint8 (1: True), other arguments as they are.  Inductor's CPU loops read a bool tensor through
    a per-lane mask conversion that costs more than the rule's exponentials: a [128, 8320] tile step's validity mask
    (one bool per column) took 0.2-0.55 ms of its 1.2-1.8 ms; read as bytes and compared with 0 inside the step, it
    fuses at full speed.  So a compiled step reads its masks as `mask != 0`, which is the mask itself in eager steps."""
    return arg.to(torch.uint8) if isinstance(arg, torch.Tensor) and arg.dtype == torch.bool else arg


def dense_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                 stream: int, row_offset: int = 0, col_offset: int = 0, valid=None) -> SampleResult:
    """The reference: the whole [B, N] weight matrix, then one two-level draw over all of it."""
    sims = anchors.float() @ keys.float().T
    rows = torch.arange(len(anchors), device=sims.device) + row_offset
    cols = torch.arange(len(key_ids), device=sims.device) + col_offset
    key, column, survivors, weight_sum, worst_score = tile_draw(sims, pos_sims, anchor_ids, key_ids, valid, stats,
                                                                cfg, stream, rows, cols)
    worst = cols[hardest_columns(sims, anchor_ids, key_ids, valid)]
    return finish(key, column, worst_score, worst, survivors, weight_sum, cfg)


def streaming_sample(anchors, parts: Sequence[KeyPart], pos_sims, anchor_ids, stats: SimilarityStats, cfg: FNEConfig,
                     *, streams: Sequence[int], row_offset: int = 0, tile_size: int | None = None,
                     compile: bool | None = None) -> SampleResult:
    """The streaming form in torch (CPU or GPU) of the draw of anchors [K, B, D] in K directions (pos_sims [K, B],
    one stream each) over candidate parts (`KeyPart`s with K keys each): fields [K, B]; memory O(K * B * tile).
    One pass over the parts laid end to end, each padded to whole sampling blocks (`_tiles`), so a small part (the
    batch's) shares the first tile of the next (the ring's): one tile step for both, no merge.  Each tile step runs
    over the K * B rows of every direction and draws inside its own race winner, so the draw needs no second pass.
    The tile (default: DEFAULT_TILE_ELEMENTS on the CPU, GPU_TILE_ELEMENTS on a GPU) is rounded up to a multiple of
    SAMPLE_BLOCK.  `compile` (see `compiled_step`) None: every tile of a draw over COMPILE_MIN_ELEMENTS
    anchor-candidate pairs or more, its small ones too (a [64, 64] tile step 0.49 -> 0.09 ms)."""
    k, b = anchors.shape[0], anchors.shape[1]
    width = sum(_padded(len(part)) for part in parts)
    if width == 0:
        return no_candidates((k, b), anchors.device)
    elements = DEFAULT_TILE_ELEMENTS if anchors.device.type == "cpu" else GPU_TILE_ELEMENTS
    tile = _padded(tile_size or max(1, min(width, elements // max(k * b, 1))))
    if compile is None:
        compile = k * b * width >= COMPILE_MIN_ELEMENTS
    result = _stream_tiles(anchors.float(), _tiles(parts, tile), pos_sims.reshape(k * b), anchor_ids.repeat(k),
                           stats, cfg, rng.stream_tensor(*streams), row_offset, compile)
    return result.map(lambda t: t.view(k, b))


def _padded(n: int) -> int:
    """n rounded up to whole sampling blocks."""
    return -(-n // SAMPLE_BLOCK) * SAMPLE_BLOCK


def _tiles(parts: Sequence[KeyPart], tile: int) -> list[list[tuple]]:
    """The parts laid end to end, each padded to whole sampling blocks (so that every block lies in one part and
    starts at its first column or a multiple of SAMPLE_BLOCK after it), cut into tiles of `tile` columns (a multiple
    of SAMPLE_BLOCK): per tile its pieces in order, (part, first, stop) for the part's columns [first, stop) or
    (None, 0, n) for n columns of padding.  The last tile ends at the last part's last column."""
    tiles, pieces, width = [], [], 0
    for part in parts:
        n, padded, start = len(part), _padded(len(part)), 0
        while start < padded:
            take = min(padded - start, tile - width)
            stop = min(start + take, n)
            pieces.append((part, start, stop))
            if start + take > stop:
                pieces.append((None, 0, start + take - stop))
            width, start = width + take, start + take
            if width == tile:
                tiles.append(pieces)
                pieces, width = [], 0
    if pieces and pieces[-1][0] is None:
        pieces.pop()
    return tiles + [pieces] if pieces else tiles


def _tile_inputs(a, pieces: list[tuple]):
    """One tile's similarities [K * B, T] (each direction's anchors a[d] times its keys, into its rows), candidate
    ids, validity (None: all valid) and global columns [T] from its pieces (`_tiles`); padding: similarity 0,
    invalid."""
    k, b = a.shape[0], a.shape[1]
    device = a.device
    sims = torch.empty(k * b, sum(stop - first for _, first, stop in pieces), device=device)
    ids, valid, cols, at = [], [], [], 0
    for part, first, stop in pieces:
        n = stop - first
        if part is None:
            sims[:, at:at + n] = 0
            ids.append(torch.full((n,), NO_NEGATIVE, dtype=torch.long, device=device))
            valid.append(torch.zeros(n, dtype=torch.bool, device=device))
            cols.append(torch.zeros(n, dtype=torch.long, device=device))
        else:
            for d in range(k):  # BLAS writes into the tile's rows and columns in place (a strided output)
                torch.mm(a[d], part.keys[d][first:stop].float().T, out=sims[d * b:(d + 1) * b, at:at + n])
            ids.append(part.ids[first:stop])
            valid.append(None if part.valid is None else part.valid[first:stop])
            cols.append(torch.arange(first, stop, device=device) + part.col_offset)
        at += n
    if len(pieces) == 1:
        return sims, ids[0], valid[0], cols[0]
    valid = [torch.ones(len(i), dtype=torch.bool, device=device) if v is None else v for i, v in zip(ids, valid)]
    return sims, torch.cat(ids), torch.cat(valid), torch.cat(cols)


def _stream_tiles(a, tiles, pos_sims, anchor_ids, stats, cfg, words, row_offset, compile) -> SampleResult:
    """`streaming_sample`'s tiles over the rows of every direction (a [K, B, D], fp32; pos_sims and anchor_ids
    [K * B]): fields [K * B]."""
    k, b = a.shape[0], a.shape[1]
    device = a.device
    rows = torch.arange(b, device=device) + row_offset
    for i, pieces in enumerate(tiles):
        sims, tile_ids, tile_valid, tile_cols = _tile_inputs(a, pieces)
        key, column, tile_survivors, tile_weight, score = compiled_step(
            "tile_draw", tile_draw, sims, pos_sims, anchor_ids, tile_ids, tile_valid, stats, cfg, words, rows,
            tile_cols, compile=compile)
        if i == 0:  # the first tile's results are the running ones (most draws have one tile)
            best_key, best_index, survivors, weight_sum = key, column, tile_survivors, tile_weight
            worst_score, rose = score, score > float("-inf")
            worst_index = torch.full((k * b,), NO_NEGATIVE, dtype=torch.long, device=device)
        else:
            survivors = survivors + tile_survivors
            weight_sum = weight_sum + tile_weight
            take = key < best_key
            best_key = torch.where(take, key, best_key)
            best_index = torch.where(take, column, best_index)
            rose = score > worst_score
            worst_score = torch.where(rose, score, worst_score)
        # a row with weight never reads its fallback column (`finish`), and a row that ends without weight had none
        # at the tile of its best score either: the column is needed only where the best score rose, weightless
        worst_index = fallback_columns(worst_index, rose & (weight_sum == 0), sims, anchor_ids, tile_ids, tile_valid,
                                       tile_cols)
    return finish(best_key, best_index, worst_score, worst_index, survivors, weight_sum, cfg)
