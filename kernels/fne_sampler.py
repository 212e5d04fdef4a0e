"""The fused FNE negative sampler in Triton (FNE_SPEC, "Streaming form"), forward only: two-level exact sampling.

It draws exactly what `fne_dist.sampler.streaming_sample` draws (see that module for the two-level law), in two
kernels, without writing any [B, N] array:

1. `_fne_blocks_kernel`, the main loop (kernels/gpu_check.sh measures it against the matmul).  Grid = anchor blocks
   x candidate splits; each program keeps its anchor block and streams candidate tiles of BLOCK_N columns (a
   multiple of SAMPLE_BLOCK): the similarity tile with `tl.dot` (fp32 accumulation; keys cast on load when their
   dtype differs), the FNE weight with the masks and the cut-down, then row reductions of the tile viewed as
   [rows, blocks, SAMPLE_BLOCK] (sum, count, max: no per-candidate race or argmax) that give per (row, block) the
   weight sum W_b, the survivor count and the best fallback score.
   The race over blocks (one hash, log and division per (row, block), not per candidate) keeps per row the
   smallest key -log(u) / W_b and its block; the fallback keeps only its best score and block (no running argmax).
   Full tiles load without masks: rows and columns past the end are clamped to the last one and dropped from
   the result, so only the feature width needs a mask when it is not a multiple of BLOCK_K; where N is a
   multiple of BLOCK_N (EVEN_N, the usual power-of-two buffer) the columns need neither clamp nor test.
2. `_fne_pick_kernel`, a few rows per program: merges the splits in column order (strict comparisons: ties go to
   the lowest block, as one sequential pass), then recomputes the SAMPLE_BLOCK similarities of the one block the
   row needs -- its race winner, or where its weight sum is 0 its fallback block -- and draws inside it by inverse
   CDF with the pick uniform (or takes the block's hardest candidate).  Rows that fall back cost one block each,
   never a second pass over the candidates.

Random numbers: `fne_dist.rng` in uint64 (`_mix64`, `_counter_bits`), bit-identical to the torch statement.

The weight, in log2 units with folded constants (`_scalar_params`, `_row_terms`), so that the epilogue is a few
fused multiply-adds per candidate.  With dp = s - mu+ and delta = mu+ - mu-, the log-odds of a false negative
logit2 = log2(f / (1 - f)) = cn (dp + delta)^2 - cp dp^2 + c0 = (qa dp + qb) dp + qc (centred on mu+, where the
posterior matters, so that its rounding stays that of the density form), and the hardness exponent
-tau log2(e) (s - p)^2 = (a s + beta) s + gamma with per-row beta, gamma; h = exp2 of it:
  - bayes: w = h / (1 + exp2(logit2));  eliminate: w = h where 1 / (1 + exp2(logit2)) > 1 - f_max, else 0;
  - official: `1 - f < false_margin` is `logit2 > log2((1 - false_margin) / false_margin)`, then
    w = exp2(-tau log2(e) f) with f = 1 / (1 + exp2(-logit2)), else h.  The released rule forms the two densities in
    fp32: where the positive density underflows to 0, its f is 0 (or 0/0 = NaN where both do) and the comparison
    keeps h.  The kernel keeps that exactly: a correctly rounded fp32 exp is 0 below log(2^-150), so "the positive
    density underflows" is |s - mu+| > r+ (`fne_dist.weights.positive_underflow_radius`, as in `fne_weights`,
    which forms the same quadratic: r+ = sqrt((-log(2^-150) - 0.5 log(2 pi var+)) 2 var+)).  (Where only
    the negative density underflows, f = 1 and the posterior branch is taken, as logit2 says);
  - until the statistics are ready the params make logit2 = -inf, which leaves w = h in every mode;
  - dropped candidates (positives, invalid slots, the cut-down) get exponent -inf, so w = 0.
Per candidate that is 3 MUFU operations in every mode but hardness (two exp2 and one reciprocal) besides the dot
product; the official rule works on -logit2 (negated coefficients) and folds its tempering -tau log2(e) into the
division, so neither costs an instruction per candidate (`compile_check` counts the main loop's SASS per tile).
Compiled, exp2 and the division are the bare approximate instructions (`ex2.approx.ftz`, `div.approx.ftz`: ~2 ulp,
and weights below 2^-126 flush to 0 where torch keeps denormals down to 2^-149; only a hardness exponent
tau (s - p)^2 > 87 reaches them); the interpreter uses tl.exp2 and c * (1 / x).
Same inputs and stream as the torch path give the same indices except where float rounding (another summation
order, another exp/log) moves a weight across a threshold or two race keys within an ulp; the tests check
identical indices at small shapes in the interpreter.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fne_dist import rng
from fne_dist.sample_result import NO_NEGATIVE, SAMPLE_BLOCK, SampleResult
from fne_dist.stats import SimilarityStats
from fne_dist.weights import (FNEConfig, global_cutdown_on, log_odds_coefficients, moments32,
                              positive_underflow_radius)

MODE_CODES = {"official": 0, "bayes": 1, "eliminate": 2, "hardness": 3}
CUTDOWN_CODES = {"global": 0, "anchor": 1, "off": 2}
LOG2E = 1.0 / math.log(2.0)
SB = tl.constexpr(SAMPLE_BLOCK)
NONE = tl.constexpr(NO_NEGATIVE)
TWO_POW_M23 = tl.constexpr(2.0**-23)


class Blocks(NamedTuple):
    """Launch configuration of the main loop: tile sizes, warps, pipeline stages and the register cap per thread
    (None: the compiler's; a cap lets more programs share an SM, so one's epilogue overlaps another's dot)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Blocks":
        """'M,N,K,warps,stages[,maxnreg]' (the benchmark's --blocks)."""
        parts = text.split(",")
        if len(parts) not in (5, 6) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"blocks {text!r}: expected five or six positive integers M,N,K,warps,stages[,maxnreg], "
                             "e.g. 128,128,64,8,3")
        return cls(*map(int, parts))

    @property
    def halvings(self) -> int:
        """How often the epilogue halves a tile's columns (`_column_pieces`): never where a thread holds at most
        EPILOGUE_WHOLE similarities of the tile, else until a piece holds EPILOGUE_PIECE (or 16 columns)."""
        per_thread = self.block_m * self.block_n // (32 * self.num_warps)
        halvings = 0
        while (per_thread > EPILOGUE_WHOLE and per_thread >> halvings > EPILOGUE_PIECE
               and self.block_n >> halvings > 16):
            halvings += 1
        return halvings

    def __str__(self) -> str:
        cap = f"/r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k}/w{self.num_warps}/s{self.num_stages}{cap}"


# On sm_90, by operand bytes (2: bf16/fp16, 4: fp32).  bf16: the fastest of kernels/gpu_check.sh's sweep (see
# docs/benchmarks/README.md); fp32: the largest tiles that compile without register spills
# (python -m fne_kernels.compile_check).
GPU_CONFIGS = {2: Blocks(128, 128, 64, 8, 3), 4: Blocks(64, 128, 32, 8, 2)}
# Similarities per thread that the epilogue takes at once (python -m fne_kernels.compile_check, sm_90): a tile of up
# to 64 whole (128x128 on 8 warps: fewest instructions), a larger one in pieces of 16 (fewest spills: 128x128 on 4
# warps, 128x256 on 8 go from ~200 and ~120 spill stores to ~10).
EPILOGUE_WHOLE = 64
EPILOGUE_PIECE = 16
PICK_BLOCKS = (2, 32)  # (rows, K chunk) per program of the pick kernel on the GPU: [2, 128, 32] products
PROGRAMS_PER_SM = 16  # main-loop programs per SM: many short ones, so that the last wave idles little of the GPU
INTERPRETER_PROGRAMS = 4
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the candidate splits)


@triton.jit
def _mix64(z):
    """SplitMix64's finaliser on uint64 (multiplications wrap mod 2^64), as fne_dist.rng.mix64."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _counter_bits(row, block_col, key1, key2):
    """fne_dist.rng.block_bits: int64 global rows and block columns (broadcast) -> the 64 hash bits (uint64)."""
    counter = (row.to(tl.uint64, bitcast=True) << 32) | block_col.to(tl.uint64, bitcast=True)
    return _mix64(_mix64(counter ^ key1) ^ key2)


@triton.jit
def _uniform(bits, SHIFT: tl.constexpr):
    """23 bits of `bits` from SHIFT up -> (x + 0.5) 2^-23 in fp32, as fne_dist.rng (never 0 or 1)."""
    return (((bits >> SHIFT) & 0x7FFFFF).to(tl.float32) + 0.5) * TWO_POW_M23


@triton.jit
def _word64(lo, hi):
    """A uint64 from its two halves, passed as int32 arguments (one argument type for any value)."""
    return ((hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)).to(tl.uint64, bitcast=True)


@triton.jit
def _load_params(params_ptr):
    """The 6 fp32 scalars of `_scalar_params`."""
    return (tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3),
            tl.load(params_ptr + 4), tl.load(params_ptr + 5))


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x; compiled: libdevice's exp2f, which Triton builds with flush-to-zero: one MUFU.EX2, results below 2^-126
    flushed to 0 (tl.exp2 adds a denormal fix-up around it)."""
    if FAST:
        return libdevice.exp2(x)
    else:
        return tl.exp2(x)


@triton.jit
def _div(c, x, FAST: tl.constexpr):
    """c / x; compiled: libdevice's fast division (div.approx.ftz: one MUFU.RCP and a multiply, ~2 ulp; the weights
    are sampling odds, not outputs); interpreted: c * (1 / x), the rounding the torch statement has."""
    if FAST:
        return libdevice.fast_dividef(c, x)
    else:
        return c * (1.0 / x)


@triton.jit
def _row_terms(p, neg_tau2, margin):
    """Per row, from its positive similarity p: the hardness exponent's linear and constant terms (see `_weights`)
    and the anchor cut-down's threshold p - margin."""
    return -2.0 * neg_tau2 * p, neg_tau2 * p * p, p - margin


@triton.jit
def _weights(s, excluded, beta, gamma, row_cut, cut_global, mean_pos, qa, qb, qc, pos_radius, neg_tau2,
             official_logit2, keep_min, MODE: tl.constexpr, CUTDOWN: tl.constexpr, FAST: tl.constexpr):
    """fne_weights of fp32 similarities s [rows, cols] (module docstring): `excluded` marks positives and invalid
    slots, beta and gamma [rows, 1] are `_row_terms`, row_cut [rows, 1] the anchor cut-down's threshold."""
    drop = excluded
    if CUTDOWN == 0:
        drop = drop | (s <= cut_global)
    elif CUTDOWN == 1:
        drop = drop | (s <= row_cut)
    hard = tl.fma(tl.fma(s, neg_tau2, beta), s, gamma)  # neg_tau2 (s - p)^2, in log2 units
    if MODE == 3:
        w = _exp2(tl.where(drop, float("-inf"), hard), FAST)
    else:
        dp = s - mean_pos
        if MODE == 0:  # -logit2 = log2((1 - f) / f) from negated coefficients: no negation per candidate
            neg_logit2 = tl.fma(tl.fma(dp, -qa, -qb), dp, -qc)
            posterior = (neg_logit2 < -official_logit2) & (tl.abs(dp) <= pos_radius)
            tempered = _div(neg_tau2, 1.0 + _exp2(neg_logit2, FAST), FAST)  # -tau log2(e) f
            w = _exp2(tl.where(drop, float("-inf"), tl.where(posterior, tempered, hard)), FAST)
        elif MODE == 1:
            logit2 = tl.fma(tl.fma(dp, qa, qb), dp, qc)
            w = _div(_exp2(tl.where(drop, float("-inf"), hard), FAST), 1.0 + _exp2(logit2, FAST), FAST)
        else:
            logit2 = tl.fma(tl.fma(dp, qa, qb), dp, qc)
            keep = _div(1.0, 1.0 + _exp2(logit2, FAST), FAST) > keep_min
            w = _exp2(tl.where(drop | ~keep, float("-inf"), hard), FAST)
    return w


@triton.jit
def _similarities(a_ptr, k_ptr, rows_in, cols_in, D, stride_am, stride_ak, stride_kn, stride_kk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """s [BLOCK_M, BLOCK_N] = anchors[rows_in] . keys[cols_in] in fp32, by `tl.dot` over BLOCK_K chunks of the
    features (keys cast to the anchors' dtype on load; only a width D that is not a multiple of BLOCK_K needs a
    mask).  The rows and columns are in range (clamped by the caller).  Shared by the sampler's main loop and the
    posterior InfoNCE's kernels (fne_infonce)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_in.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    k_ptrs = k_ptr + cols_in.to(tl.int64)[None, :] * stride_kn + offs_k[:, None] * stride_kk
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            kt = tl.load(k_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < D, other=0.0)
            kt = tl.load(k_ptrs, mask=(k0 + offs_k)[:, None] < D, other=0.0)
        s = tl.dot(a, kt.to(a.dtype), s, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        k_ptrs += BLOCK_K * stride_kk
    return s


@triton.jit
def _column_pieces(x, HALVINGS: tl.constexpr):
    """x [rows, cols] -> a tuple of its 2^HALVINGS column pieces in order, each thread keeping its own elements (the
    pieces are views of the registers, no data moves)."""
    pieces = (x,)
    for _ in tl.static_range(HALVINGS):
        halved = ()
        for i in tl.static_range(len(pieces)):
            piece = pieces[i]
            pairs = tl.permute(tl.reshape(piece, [piece.shape[0], 2, piece.shape[1] // 2]), (0, 2, 1))
            first, second = tl.split(pairs)
            halved = halved + (first, second)
        pieces = halved
    return pieces


@triton.jit
def _piece_sums(s, cols, ids, rule, BLOCKS: tl.constexpr, MODE: tl.constexpr, CUTDOWN: tl.constexpr,
                HAS_VALID: tl.constexpr, FAST: tl.constexpr, EVEN_N: tl.constexpr):
    """The similarities s [rows, W] of the columns `cols` [1, W], cut into BLOCKS equal column groups -> per row and
    group [rows, BLOCKS]: the weight sum, the survivor count and the best fallback score."""
    aid, global_rows, col_offset, k1, k2, kid_ptr, valid_ptr, N = ids
    beta, gamma, row_cut, cut_global, mean_pos, qa, qb, qc, pos_radius, neg_tau2, official_logit2, keep_min = rule
    cols_in = cols if EVEN_N else tl.minimum(cols, N - 1)  # loads without masks; columns past N are dropped below
    if HAS_VALID:
        col_bad = tl.load(valid_ptr + cols_in) == 0
        if not EVEN_N:
            col_bad = (cols >= N) | col_bad
        excluded = (aid[:, None] == tl.load(kid_ptr + cols_in)) | col_bad
    else:
        excluded = aid[:, None] == tl.load(kid_ptr + cols_in)
        if not EVEN_N:
            excluded = excluded | (cols >= N)
    w = _weights(s, excluded, beta, gamma, row_cut, cut_global, mean_pos, qa, qb, qc, pos_radius, neg_tau2,
                 official_logit2, keep_min, MODE, CUTDOWN, FAST)
    score = tl.where(excluded, float("-inf"), s)
    shape: tl.constexpr = [s.shape[0], BLOCKS, s.shape[1] // BLOCKS]
    return (tl.sum(tl.reshape(w, shape), axis=2), tl.sum(tl.reshape((w > 0).to(tl.int32), shape), axis=2),
            tl.max(tl.reshape(score, shape), axis=2))


@triton.jit
def _race(state, sums, block0, ids):
    """Fold per-row sums [rows, NB] of the sampling blocks block0 .. block0 + NB into the per-row state: survivors,
    weight sum, the race over the blocks (one uniform each) and the best fallback block."""
    best_key, best_block, hardest, hardest_block, survivors, weight_sum = state
    block_w, block_n, block_s = sums
    aid, global_rows, col_offset, k1, k2, kid_ptr, valid_ptr, N = ids
    survivors += tl.sum(block_n, axis=1)
    weight_sum += tl.sum(block_w, axis=1)
    blocks = block0 + tl.arange(0, block_w.shape[1])
    bits = _counter_bits(global_rows[:, None], col_offset.to(tl.int64) + blocks[None, :].to(tl.int64) * SB, k1, k2)
    race = tl.where(block_w > 0, -tl.log(_uniform(bits, 41)) / tl.where(block_w > 0, block_w, 1.0), float("inf"))
    key, arg = tl.min(race, axis=1, return_indices=True, return_indices_tie_break_left=True)
    take = key < best_key
    best_key = tl.where(take, key, best_key)
    best_block = tl.where(take, block0 + arg, best_block)
    top, arg = tl.max(block_s, axis=1, return_indices=True, return_indices_tie_break_left=True)
    take = top > hardest
    hardest = tl.where(take, top, hardest)
    hardest_block = tl.where(take, block0 + arg, hardest_block)
    return best_key, best_block, hardest, hardest_block, survivors, weight_sum


@triton.jit(do_not_specialize=["key1_lo", "key1_hi", "key2_lo", "key2_hi", "row_offset", "col_offset"])
def _fne_blocks_kernel(
    a_ptr, k_ptr, pos_ptr, aid_ptr, kid_ptr, valid_ptr, params_ptr,
    out_key_ptr, out_block_ptr, out_score_ptr, out_sblock_ptr, out_surv_ptr, out_wsum_ptr,
    B, N, D, stride_am, stride_ak, stride_kn, stride_kk, tiles_per_split,
    key1_lo, key1_hi, key2_lo, key2_hi, row_offset, col_offset, margin, neg_tau2, official_logit2, keep_min,
    MODE: tl.constexpr, CUTDOWN: tl.constexpr, HAS_VALID: tl.constexpr, FAST: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HALVINGS: tl.constexpr,
):
    """Per row of the anchor block, over one split of candidate tiles: the best block race key and its block, the
    best fallback score and its block, survivors and weight sum.  The epilogue walks each tile in 2^HALVINGS column
    pieces, so that the registers its temporaries need do not grow with the tile."""
    NB: tl.constexpr = BLOCK_N // SB
    PIECE: tl.constexpr = BLOCK_N >> HALVINGS
    PIECE_BLOCKS: tl.constexpr = max(1, PIECE // SB)  # sampling blocks per piece, and pieces per block
    BLOCK_PIECES: tl.constexpr = max(1, SB // PIECE)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = tl.minimum(rows, B - 1)  # clamped: loads without masks; rows past B are not stored
    beta, gamma, row_cut = _row_terms(tl.load(pos_ptr + rows_in), neg_tau2, margin)
    aid = tl.load(aid_ptr + rows_in)
    cut_global, mean_pos, qa, qb, qc, pos_radius = _load_params(params_ptr)
    k1 = _word64(key1_lo, key1_hi)
    k2 = _word64(key2_lo, key2_hi)
    global_rows = row_offset.to(tl.int64) + rows

    rule = (beta[:, None], gamma[:, None], row_cut[:, None], cut_global, mean_pos, qa, qb, qc, pos_radius, neg_tau2,
            official_logit2, keep_min)
    ids = (aid, global_rows, col_offset, k1, k2, kid_ptr, valid_ptr, N)
    # per row: best race key and its block, best fallback score and its block, survivors, weight sum
    state = (tl.full([BLOCK_M], float("inf"), tl.float32), tl.zeros([BLOCK_M], tl.int32),
             tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.int32),
             tl.zeros([BLOCK_M], tl.int32), tl.zeros([BLOCK_M], tl.float32))
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(first, last):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_in = cols if EVEN_N else tl.minimum(cols, N - 1)
        s = _similarities(a_ptr, k_ptr, rows_in, cols_in, D, stride_am, stride_ak, stride_kn, stride_kk,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION)
        s_pieces = _column_pieces(s, HALVINGS)
        col_pieces = _column_pieces(cols[None, :], HALVINGS)
        for g in tl.static_range(len(s_pieces) // BLOCK_PIECES):  # groups of pieces that cover whole blocks
            for q in tl.static_range(BLOCK_PIECES):
                more = _piece_sums(s_pieces[g * BLOCK_PIECES + q], col_pieces[g * BLOCK_PIECES + q], ids, rule,
                                   PIECE_BLOCKS, MODE, CUTDOWN, HAS_VALID, FAST, EVEN_N)
                if q == 0:
                    sums = more
                else:
                    sums = (sums[0] + more[0], sums[1] + more[1], tl.maximum(sums[2], more[2]))
            state = _race(state, sums, t * NB + g * PIECE_BLOCKS, ids)

    best_key, best_block, hardest, hardest_block, survivors, weight_sum = state
    out = pid_s * B + rows
    row_ok = rows < B
    tl.store(out_key_ptr + out, best_key, mask=row_ok)
    tl.store(out_block_ptr + out, best_block, mask=row_ok)
    tl.store(out_score_ptr + out, hardest, mask=row_ok)
    tl.store(out_sblock_ptr + out, hardest_block, mask=row_ok)
    tl.store(out_surv_ptr + out, survivors, mask=row_ok)
    tl.store(out_wsum_ptr + out, weight_sum, mask=row_ok)


@triton.jit(do_not_specialize=["key1_lo", "key1_hi", "key2_lo", "key2_hi", "row_offset", "col_offset"])
def _fne_pick_kernel(
    a_ptr, k_ptr, pos_ptr, aid_ptr, kid_ptr, valid_ptr, params_ptr,
    key_ptr, block_ptr, score_ptr, sblock_ptr, surv_ptr, wsum_ptr,
    index_ptr, fallback_ptr, survivors_ptr, weight_sum_ptr, race_key_ptr, fallback_score_ptr, fallback_index_ptr,
    B, N, D, stride_am, stride_ak, stride_kn, stride_kk, SPLITS,
    key1_lo, key1_hi, key2_lo, key2_hi, row_offset, col_offset, margin, neg_tau2, official_logit2, keep_min,
    MODE: tl.constexpr, CUTDOWN: tl.constexpr, HAS_VALID: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_R rows: merge the splits, then draw inside each row's winning block (inverse CDF) or take its fallback
    block's hardest candidate, from that one block's recomputed similarities."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    rows_in = tl.minimum(rows, B - 1)
    best_key = tl.load(key_ptr + rows_in)
    best_block = tl.load(block_ptr + rows_in)
    hardest = tl.load(score_ptr + rows_in)
    hardest_block = tl.load(sblock_ptr + rows_in)
    survivors = tl.load(surv_ptr + rows_in)
    weight_sum = tl.load(wsum_ptr + rows_in)
    for split in range(1, SPLITS):
        at = split * B + rows_in
        key = tl.load(key_ptr + at)
        take = key < best_key
        best_key = tl.where(take, key, best_key)
        best_block = tl.where(take, tl.load(block_ptr + at), best_block)
        score = tl.load(score_ptr + at)
        take = score > hardest
        hardest = tl.where(take, score, hardest)
        hardest_block = tl.where(take, tl.load(sblock_ptr + at), hardest_block)
        survivors += tl.load(surv_ptr + at)
        weight_sum += tl.load(wsum_ptr + at)
    drawn = weight_sum > 0
    needs_fallback = (weight_sum == 0) & (hardest > float("-inf"))
    width = tl.where(drawn | needs_fallback, D, 0)  # the other rows load nothing below

    block = tl.where(drawn, best_block, hardest_block)
    offs = tl.arange(0, SB)
    cols = block[:, None] * SB + offs[None, :]
    cols_in = tl.minimum(cols, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_in.to(tl.int64)[:, None, None] * stride_am + offs_k[None, None, :] * stride_ak
    k_ptrs = k_ptr + cols_in.to(tl.int64)[:, :, None] * stride_kn + offs_k[None, None, :] * stride_kk
    s = tl.zeros([BLOCK_R, SB], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k)[None, None, :] < width[:, None, None]
        a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        kt = tl.load(k_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        s += tl.sum(kt * a, axis=2)
        a_ptrs += BLOCK_K * stride_ak
        k_ptrs += BLOCK_K * stride_kk
    reach = (cols_in < tl.where(width > 0, N, 0)[:, None])
    col_bad = cols >= N
    if HAS_VALID:
        col_bad = col_bad | (tl.load(valid_ptr + cols_in, mask=reach, other=0) == 0)
    aid = tl.load(aid_ptr + rows_in)
    excluded = (aid[:, None] == tl.load(kid_ptr + cols_in, mask=reach, other=0)) | col_bad
    cut_global, mean_pos, qa, qb, qc, pos_radius = _load_params(params_ptr)
    beta, gamma, row_cut = _row_terms(tl.load(pos_ptr + rows_in), neg_tau2, margin)
    w = _weights(s, excluded, beta[:, None], gamma[:, None], row_cut[:, None], cut_global, mean_pos, qa, qb, qc,
                 pos_radius, neg_tau2, official_logit2, keep_min, MODE, CUTDOWN, FAST)
    hardest_col = tl.argmax(tl.where(excluded, float("-inf"), s), axis=1, tie_break_left=True)

    k1 = _word64(key1_lo, key1_hi)
    k2 = _word64(key2_lo, key2_hi)
    block_col = col_offset.to(tl.int64) + block.to(tl.int64) * SB
    u = _uniform(_counter_bits(row_offset.to(tl.int64) + rows, block_col, k1, k2), 9)
    cdf = tl.cumsum(w, axis=1)
    first = tl.sum((cdf <= (u * tl.max(cdf, axis=1))[:, None]).to(tl.int32), axis=1)
    last = tl.max(tl.where(w > 0, offs[None, :], -1), axis=1)
    pick = tl.where(first < SB, first, last)
    pick = tl.where(pick >= 0, pick, hardest_col)  # only if recomputing lost every weight of the block
    fallback = needs_fallback & (MODE != 2)
    index = tl.where(drawn, block_col + pick, tl.where(fallback, block_col + hardest_col, NONE))
    tl.store(index_ptr + rows, index.to(tl.int64), mask=row_ok)
    tl.store(fallback_ptr + rows, fallback.to(tl.uint8), mask=row_ok)
    tl.store(survivors_ptr + rows, survivors.to(tl.int64), mask=row_ok)
    tl.store(weight_sum_ptr + rows, weight_sum, mask=row_ok)
    tl.store(race_key_ptr + rows, best_key, mask=row_ok)
    tl.store(fallback_score_ptr + rows, hardest, mask=row_ok)
    tl.store(fallback_index_ptr + rows, tl.where(needs_fallback, block_col + hardest_col, NONE).to(tl.int64),
             mask=row_ok)


def _scalar_params(stats: SimilarityStats, cfg: FNEConfig, device: torch.device) -> torch.Tensor:
    """[global cut-down threshold, mu+, qa, qb, qc, r+] in fp32 on `device` (see the module docstring), by device ops
    only (no host sync).  The threshold is mu+ - margin where fne_weights applies the global cut-down (official,
    hardness: once a positive was counted; bayes, eliminate: once the stats are ready) and -inf before.  Until the
    stats are ready qa = qb = 0 and qc = -inf, so logit2 = -inf and w = h.  (qa, qb, qc) are
    `fne_dist.weights.log_odds_coefficients` in log2 units, the posterior's one statement as a quadratic."""
    mean_pos = moments32(stats, device)[0]
    ready = stats.ready(cfg.min_count).to(device)
    counted = global_cutdown_on(stats, cfg).to(device)
    coefficients = log_odds_coefficients(stats, cfg, device)  # natural log units: log2 below
    return torch.stack([
        torch.where(counted, mean_pos - cfg.margin, float("-inf")),
        torch.where(ready, mean_pos, 0.0), *(coefficients[1:] * LOG2E),
        torch.where(ready, positive_underflow_radius(stats, device), math.inf),
    ]).float()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def fit_k(d: int) -> int:
    """The smallest K chunk (a power of two >= 16, tl.dot's minimum) that covers width d."""
    return max(16, triton.next_power_of_2(d))


def _config(b: int, d: int, dtype: torch.dtype, compiled: bool, tile_size: int | None) -> Blocks:
    """The main loop's `Blocks`: `GPU_CONFIGS` on the GPU (BLOCK_M capped by the batch),
    one config in the interpreter, where every program step costs Python overhead: blocks as large as the shapes
    allow.  `tile_size` overrides BLOCK_N (a power of two >= SAMPLE_BLOCK)."""
    if tile_size is not None and (tile_size < SAMPLE_BLOCK or tile_size & (tile_size - 1)):
        raise ValueError(f"triton_sample tile_size={tile_size}: the kernel's candidate tile must be a power of two "
                         f">= SAMPLE_BLOCK={SAMPLE_BLOCK}")
    fit_m = max(16, triton.next_power_of_2(b))
    if compiled:
        blocks = GPU_CONFIGS[dtype.itemsize]
        return blocks._replace(block_m=min(blocks.block_m, fit_m), block_n=tile_size or blocks.block_n,
                               block_k=min(blocks.block_k, fit_k(d)))
    return Blocks(min(128, fit_m), tile_size or 256, min(256, fit_k(d)), 4, 1)


def _int32_halves(word: int) -> tuple[int, int]:
    """(low, high) 32-bit halves of a 64-bit word, each as a signed int32 value."""
    return tuple(((word >> shift) & 0xFFFFFFFF) - ((word >> shift) & 0x80000000) * 2 for shift in (0, 32))


def _dot_dtype(anchors: torch.Tensor, keys: torch.Tensor) -> torch.dtype:
    """The narrower of the two dtypes (the keys' on a tie): the anchors ([B, D], small) are cast to it on the host,
    the keys tile by tile on load, so mixed dtypes never copy the candidates."""
    return anchors.dtype if anchors.element_size() < keys.element_size() else keys.dtype


def triton_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                  stream: int, row_offset: int = 0, col_offset: int = 0, valid=None, tile_size: int | None = None,
                  splits: int | None = None) -> SampleResult:
    """The fused sampler: the arguments of `fne_dist.sampler.dense_sample`, and the draw that the torch streaming
    sampler makes of one direction (`fne_dist.fne.sample_negatives`).

    anchors [B, D] and keys [N, D] in bf16, fp16 or fp32 (any strides; with different dtypes the product runs in
    the narrower one, see `_dot_dtype`), valid [N] bool or None.  `tile_size` is the kernel's candidate tile (a
    power of two >= SAMPLE_BLOCK); `splits` the number of programs along the candidates (default: about
    PROGRAMS_PER_SM programs per SM).  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not (anchors.is_cuda or interpreting):
        raise RuntimeError("triton_sample needs CUDA tensors; on the CPU use impl='torch', or set TRITON_INTERPRET=1 "
                           "before fne_kernels.fne_sampler is imported (slow, for tests)")
    if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"triton_sample needs anchors [B, D] and keys [N, D]; got {tuple(anchors.shape)} and "
                         f"{tuple(keys.shape)}")
    b, d = anchors.shape
    n = keys.shape[0]
    if n == 0:
        raise ValueError("triton_sample: keys is empty; sampling needs at least one candidate")
    if valid is not None and tuple(valid.shape) != (n,):
        raise ValueError(f"triton_sample: valid must be a [N]={n} bool mask over the candidates, got "
                         f"{tuple(valid.shape)}")
    for name, x in (("anchors", anchors), ("keys", keys)):
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"triton_sample: {name} must be bf16, fp16 or fp32, got {x.dtype}")
    device = anchors.device
    long_out = [torch.empty(b, dtype=torch.long, device=device) for _ in range(3)]  # index, survivors, fallback_index
    fallback = torch.empty(b, dtype=torch.uint8, device=device)
    float_out = [torch.empty(b, dtype=torch.float32, device=device) for _ in range(3)]  # weight_sum, race_key, score
    result = SampleResult(long_out[0], fallback.view(torch.bool), long_out[1], float_out[0], float_out[1],
                          float_out[2], long_out[2])
    if b == 0:
        return result
    anchors = anchors.to(_dot_dtype(anchors, keys))

    compiled = anchors.is_cuda and not interpreting
    blocks = _config(b, d, anchors.dtype, compiled, tile_size)
    block_m, block_n, block_k = blocks.block_m, blocks.block_n, blocks.block_k
    m_blocks, n_tiles = triton.cdiv(b, block_m), triton.cdiv(n, block_n)
    if splits is None:
        programs = PROGRAMS_PER_SM * _sm_count(device.index or 0) if compiled else INTERPRETER_PROGRAMS
        splits = max(1, programs // m_blocks)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles, MAX_GRID_Y)))
    splits = triton.cdiv(n_tiles, tiles_per_split)

    part = [torch.empty(splits, b, dtype=dt, device=device)
            for dt in (torch.float32, torch.int32, torch.float32, torch.int32, torch.int32, torch.float32)]
    params = _scalar_params(stats, cfg, device)
    valid_arg = params if valid is None else valid.to(device=device, dtype=torch.uint8).contiguous()  # params: unused
    keys_words = [half for word in rng.stream_words(stream) for half in _int32_halves(word)]
    inputs = (anchors, keys, pos_sims.float().contiguous(), anchor_ids.long().contiguous(), key_ids.long().contiguous(),
              valid_arg, params)
    shape = (b, n, d, anchors.stride(0), anchors.stride(1), keys.stride(0), keys.stride(1))
    rule = (*keys_words, row_offset, col_offset, cfg.margin, -cfg.tau * LOG2E,
            math.log2((1 - cfg.false_margin) / cfg.false_margin), 1 - cfg.f_max)
    flags = dict(MODE=MODE_CODES[cfg.mode], CUTDOWN=CUTDOWN_CODES[cfg.cutdown], HAS_VALID=valid is not None,
                 FAST=compiled)
    _fne_blocks_kernel[(m_blocks, splits)](
        *inputs, *part, *shape, tiles_per_split, *rule, **flags, EVEN_K=d % block_k == 0, EVEN_N=n % block_n == 0,
        INPUT_PRECISION="ieee" if anchors.dtype == torch.float32 else "tf32",  # only read for fp32 operands
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HALVINGS=blocks.halvings, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        **({"maxnreg": blocks.maxnreg} if blocks.maxnreg else {}),
    )
    pick_r, pick_k = PICK_BLOCKS if compiled else (min(64, triton.next_power_of_2(b)), min(64, fit_k(d)))
    _fne_pick_kernel[(triton.cdiv(b, pick_r),)](
        *inputs, *part, long_out[0], fallback, long_out[1], *float_out, long_out[2], *shape, splits, *rule, **flags,
        BLOCK_R=pick_r, BLOCK_K=min(pick_k, fit_k(d)), num_warps=4,
    )
    return result
