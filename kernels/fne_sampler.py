"""The fused FNE negative sampler in Triton (FNE_SPEC, "Streaming form"), forward only.

One kernel computes, for a block of anchors and a contiguous range of candidate tiles, everything the
streaming torch path (`fne_dist.sampler.streaming_sample`) computes, without writing any [B, N] array:
the similarity tile with `tl.dot` (fp32 accumulation), the positive mask from the ids, the validity mask,
the FNE weight of `fne_dist.weights.fne_weights`, the cut-down, the exponential race (key = -log(u) / w,
running minimum and its column), the running argmax of the fallback score (`fallback_scores`: the
similarity, -inf on positives and invalid slots), and per row the survivor count and the weight sum.
The candidates are split across programs (grid = anchor blocks x candidate splits) so that a few anchors
still fill the GPU; a second small kernel merges each row's partial winners in split order with strict
comparisons, so that ties go to the lowest column exactly as in one sequential pass.

Same random numbers as the torch path.  The uniforms are computed in uint32 exactly as in `fne_dist.rng`:
row_hash(stream, row_offset + i), col_hash(stream, column), the MurmurHash3 finaliser of their xor, the
top 23 bits -> ((bits >> 9) + 0.5) * 2^-23.  Both paths therefore race the same exponentials and, on the
same inputs, stream and row_offset, pick the same indices -- except where float rounding (another
summation order in the dot product, another exp/log) moves a weight across a threshold (the cut-down, the
official rule's false_margin, zero) or swaps two race keys equal to within an ulp.  The tests check
identical indices and survivor counts at small shapes in the interpreter.

The posterior, written once in the log domain.  With lp = log N(s; mu+, var+), ln = log N(s; mu-, var-),
logit = lp - ln - log(rho - 1) is log(f / (1 - f)), so f = sigmoid(logit) and 1 - f = sigmoid(-logit):
  - bayes: w = h * sigmoid(-logit), finite for any s (as fne_weights computes it);
  - official: `1 - f < false_margin` is `logit > log((1 - false_margin) / false_margin)` and then
    w = exp(-tau * sigmoid(logit)), else w = h.  The released rule forms the two densities in fp32, and
    where both underflow to 0 its f is 0/0 = NaN, the comparison is False and w = h.  The kernel
    reproduces that with an explicit condition: a correctly rounded fp32 exp returns 0 exactly below
    log(2^-150), so "both densities underflow" is `lp < log(2^-150) and ln < log(2^-150)`.

Scalars.  The ready flag and the fp32 constants derived from the moments (the global threshold mu+ - margin,
1/(2 var), 0.5 log(2 pi var)) are computed by a few torch ops into a small device tensor that the kernel
loads: with the statistics on the features' device (as the trainer keeps them) a call never synchronises
the host with the device.  The cfg values are plain arguments.

Performance on a GPU is unmeasured so far (see docs/benchmarks/README.md); the block sizes are the largest
that compile for sm_90 without register spills.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from fne_dist.sampler import SampleResult
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig

MODE_CODES = {"official": 0, "bayes": 1}
CUTDOWN_CODES = {"global": 0, "anchor": 1, "off": 2}
# exp(x) in fp32 (correctly rounded, denormals kept) is 0 exactly for x < log(2^-150).
LOG_UNDERFLOW = tl.constexpr(-150.0 * math.log(2.0))
TWO_POW_M23 = tl.constexpr(2.0**-23)
PROGRAMS_PER_SM = 4
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on the GPU for {False: bf16/fp16, True: fp32} operands.
GPU_BLOCKS = {False: (128, 64, 64, 8, 3), True: (64, 64, 32, 8, 2)}
INTERPRETER_PROGRAMS = 4
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the candidate splits)


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 (multiplications wrap mod 2^32), as fne_dist.rng.fmix32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _fne_weight(s, p, ready, mean_pos, inv2var_pos, lognorm_pos, mean_neg, inv2var_neg, lognorm_neg,
                neg_tau, log_rho1, official_logit, MODE: tl.constexpr):
    """The FNE weight before the masks and the cut-down (fne_weights' `w`), elementwise on [M, N]."""
    d = s - p
    hard = tl.exp(neg_tau * (d * d))
    dp = s - mean_pos
    dn = s - mean_neg
    log_pos = -(dp * dp) * inv2var_pos - lognorm_pos
    log_neg = -(dn * dn) * inv2var_neg - lognorm_neg
    logit = log_pos - log_neg - log_rho1
    if MODE == 0:
        # f is read only where logit > official_logit; the clamp keeps exp finite elsewhere.
        f = 1.0 / (1.0 + tl.exp(-tl.maximum(logit, official_logit)))
        underflow = (log_pos < LOG_UNDERFLOW) & (log_neg < LOG_UNDERFLOW)
        rule = tl.where((logit > official_logit) & ~underflow, tl.exp(neg_tau * f), hard)
    else:
        rule = hard * (1.0 / (1.0 + tl.exp(logit)))
    return tl.where(ready, rule, hard)


@triton.jit(do_not_specialize=["stream", "row_offset"])
def _fne_partial_kernel(
    a_ptr, k_ptr, pos_ptr, aid_ptr, kid_ptr, valid_ptr, params_ptr,
    out_key_ptr, out_idx_ptr, out_score_ptr, out_hidx_ptr, out_surv_ptr, out_wsum_ptr,
    B, N, D, stride_am, stride_ak, stride_kn, stride_kk, tiles_per_split,
    stream, row_offset, margin, neg_tau, log_rho1, official_logit,
    MODE: tl.constexpr, CUTDOWN: tl.constexpr, HAS_VALID: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Race winner, fallback winner, survivors and weight sum of rows [pid_m block] over one candidate split."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    p = tl.load(pos_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    aid = tl.load(aid_ptr + rows, mask=row_ok, other=0)
    ready = tl.load(params_ptr) > 0.5
    cut_global = tl.load(params_ptr + 1)
    mean_pos = tl.load(params_ptr + 2)
    inv2var_pos = tl.load(params_ptr + 3)
    lognorm_pos = tl.load(params_ptr + 4)
    mean_neg = tl.load(params_ptr + 5)
    inv2var_neg = tl.load(params_ptr + 6)
    lognorm_neg = tl.load(params_ptr + 7)
    stream_bits = stream.to(tl.uint32)
    row_bits = _fmix32((row_offset + rows).to(tl.uint32) * 0x9E3779B9 + stream_bits)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am

    best_key = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    hardest = tl.full([BLOCK_M], float("-inf"), tl.float32)
    hardest_idx = tl.zeros([BLOCK_M], tl.int32)
    survivors = tl.zeros([BLOCK_M], tl.int32)
    weight_sum = tl.zeros([BLOCK_M], tl.float32)
    first = pid_s * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(first, last):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k_cols = k_ptr + cols.to(tl.int64)[None, :] * stride_kn
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            kt = tl.load(k_cols + ks[:, None] * stride_kk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            s = tl.dot(a, kt, s, input_precision=INPUT_PRECISION)

        kid = tl.load(kid_ptr + cols, mask=col_ok, other=0)
        masked = (aid[:, None] == kid[None, :]) | ~col_ok[None, :]
        if HAS_VALID:
            masked |= (tl.load(valid_ptr + cols, mask=col_ok, other=0) == 0)[None, :]
        drop = masked
        if CUTDOWN == 0:
            drop |= s <= cut_global
        elif CUTDOWN == 1:
            drop |= s <= (p - margin)[:, None]
        w = _fne_weight(s, p[:, None], ready, mean_pos, inv2var_pos, lognorm_pos, mean_neg, inv2var_neg, lognorm_neg,
                        neg_tau, log_rho1, official_logit, MODE)
        w = tl.where(drop, 0.0, w)
        survivors += tl.sum((w > 0).to(tl.int32), axis=1)
        weight_sum += tl.sum(w, axis=1)

        col_bits = _fmix32(cols.to(tl.uint32) ^ stream_bits)
        bits = _fmix32(row_bits[:, None] ^ col_bits[None, :])
        u = ((bits >> 9).to(tl.float32) + 0.5) * TWO_POW_M23
        race = tl.where(w > 0, -tl.log(u) / tl.where(w > 0, w, 1.0), float("inf"))
        key, arg = tl.min(race, axis=1, return_indices=True, return_indices_tie_break_left=True)
        take = key < best_key
        best_key = tl.where(take, key, best_key)
        best_idx = tl.where(take, t * BLOCK_N + arg, best_idx)

        score = tl.where(masked, float("-inf"), s)
        top, arg = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        take = top > hardest
        hardest = tl.where(take, top, hardest)
        hardest_idx = tl.where(take, t * BLOCK_N + arg, hardest_idx)

    out = pid_s * B + rows
    tl.store(out_key_ptr + out, best_key, mask=row_ok)
    tl.store(out_idx_ptr + out, best_idx, mask=row_ok)
    tl.store(out_score_ptr + out, hardest, mask=row_ok)
    tl.store(out_hidx_ptr + out, hardest_idx, mask=row_ok)
    tl.store(out_surv_ptr + out, survivors, mask=row_ok)
    tl.store(out_wsum_ptr + out, weight_sum, mask=row_ok)


@triton.jit
def _fne_combine_kernel(
    key_ptr, idx_ptr, score_ptr, hidx_ptr, surv_ptr, wsum_ptr,
    index_ptr, fallback_ptr, survivors_ptr, weight_sum_ptr,
    B, SPLITS, BLOCK: tl.constexpr,
):
    """Merge the splits of each row in column order; strict comparisons keep the lowest column on ties."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    best_key = tl.load(key_ptr + rows, mask=ok, other=float("inf"))
    best_idx = tl.load(idx_ptr + rows, mask=ok, other=0)
    hardest = tl.load(score_ptr + rows, mask=ok, other=float("-inf"))
    hardest_idx = tl.load(hidx_ptr + rows, mask=ok, other=0)
    survivors = tl.load(surv_ptr + rows, mask=ok, other=0)
    weight_sum = tl.load(wsum_ptr + rows, mask=ok, other=0.0)
    for split in range(1, SPLITS):
        at = split * B + rows
        key = tl.load(key_ptr + at, mask=ok, other=float("inf"))
        take = key < best_key
        best_key = tl.where(take, key, best_key)
        best_idx = tl.where(take, tl.load(idx_ptr + at, mask=ok, other=0), best_idx)
        score = tl.load(score_ptr + at, mask=ok, other=float("-inf"))
        take = score > hardest
        hardest = tl.where(take, score, hardest)
        hardest_idx = tl.where(take, tl.load(hidx_ptr + at, mask=ok, other=0), hardest_idx)
        survivors += tl.load(surv_ptr + at, mask=ok, other=0)
        weight_sum += tl.load(wsum_ptr + at, mask=ok, other=0.0)
    fallback = weight_sum == 0
    tl.store(index_ptr + rows, tl.where(fallback, hardest_idx, best_idx).to(tl.int64), mask=ok)
    tl.store(fallback_ptr + rows, fallback.to(tl.uint8), mask=ok)
    tl.store(survivors_ptr + rows, survivors.to(tl.int64), mask=ok)
    tl.store(weight_sum_ptr + rows, weight_sum, mask=ok)


def _scalar_params(stats: SimilarityStats, cfg: FNEConfig, device: torch.device) -> torch.Tensor:
    """[ready, global cut-down threshold, mu+, 1/(2 var+), 0.5 log(2 pi var+), mu-, 1/(2 var-), 0.5 log(2 pi var-)]
    in fp32 on `device`, by device ops only (no host sync); fp32 rounding as in fne_weights.  The threshold is
    mu+ - margin where fne_weights applies the global cut-down (official: once a positive was counted; bayes: once
    the stats are ready) and -inf before (no candidate is cut)."""
    mean_pos, var_pos, mean_neg, var_neg = (t.to(device=device, dtype=torch.float32) for t in stats.moments())
    ready = stats.ready(cfg.min_count).to(device=device, dtype=torch.float32)
    counted = stats.count_pos.to(device) > 0 if cfg.mode == "official" else ready > 0
    return torch.stack([
        ready, torch.where(counted, mean_pos - cfg.margin, float("-inf")),
        mean_pos, 1.0 / (2 * var_pos), 0.5 * torch.log(2 * math.pi * var_pos),
        mean_neg, 1.0 / (2 * var_neg), 0.5 * torch.log(2 * math.pi * var_neg),
    ])


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _blocks(b: int, d: int, dtype: torch.dtype, compiled: bool, tile_size: int | None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).

    On the GPU, `GPU_BLOCKS`: the largest tiles whose fp32 epilogue (similarity, weight, race key, fallback
    score, hash bits) compiled for sm_90 without register spills (`python -m fne_kernels.compile_check`);
    untimed starting points, to be tuned with `fne-bench sampler --tile-size`.  fp32 operands go through the
    CUDA cores (input_precision="ieee", as torch's default fp32 matmul), hence smaller tiles.  In the
    interpreter, where every program step costs Python overhead, blocks as large as the shapes allow.
    """
    if tile_size is not None and (tile_size < 16 or tile_size & (tile_size - 1)):
        raise ValueError(f"triton_sample tile_size={tile_size}: the kernel's candidate tile must be a power of two >= 16")
    fit_m = max(16, triton.next_power_of_2(b))
    if compiled:
        block_m, block_n, block_k, num_warps, num_stages = GPU_BLOCKS[dtype == torch.float32]
        return min(block_m, fit_m), tile_size or block_n, block_k, num_warps, num_stages
    return min(128, fit_m), tile_size or 256, min(256, max(16, triton.next_power_of_2(d))), 4, 1


def triton_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats: SimilarityStats, cfg: FNEConfig, *,
                  stream: int, row_offset: int = 0, col_offset: int = 0, valid=None, tile_size: int | None = None,
                  splits: int | None = None) -> SampleResult:
    """The fused sampler: same arguments and result as `fne_dist.sampler.streaming_sample`.

    anchors [B, D] and keys [N, D] in bf16, fp16 or fp32 (other strides allowed; different dtypes are
    promoted to a common one by a copy), valid [N] bool or None.  `tile_size` is the kernel's candidate tile
    (a power of two); `splits` the number of programs along the candidates (default: enough programs for
    about PROGRAMS_PER_SM waves of the GPU).  CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    if col_offset or cfg.mode not in MODE_CODES:
        raise NotImplementedError("triton_sample: col_offset and the eliminate / hardness modes come with the "
                                  "two-level kernel; use impl='torch'")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not (anchors.is_cuda or interpreting):
        raise RuntimeError("triton_sample needs CUDA tensors; on the CPU use impl='torch', or set TRITON_INTERPRET=1 "
                           "before fne_kernels.fne_sampler is imported (slow, for tests)")
    if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"triton_sample needs anchors [B, D] and keys [N, D]; got {tuple(anchors.shape)} and {tuple(keys.shape)}")
    b, d = anchors.shape
    n = keys.shape[0]
    if n == 0:
        raise ValueError("triton_sample: keys is empty; sampling needs at least one candidate")
    if valid is not None and tuple(valid.shape) != (n,):
        raise ValueError(f"triton_sample: valid must be a [N]={n} bool mask over the candidates, got {tuple(valid.shape)}")
    device = anchors.device
    index, survivors = (torch.empty(b, dtype=torch.long, device=device) for _ in range(2))
    fallback = torch.empty(b, dtype=torch.uint8, device=device)
    weight_sum = torch.empty(b, dtype=torch.float32, device=device)
    result = SampleResult(index, fallback.view(torch.bool), survivors, weight_sum)
    if b == 0:
        return result
    if anchors.dtype != keys.dtype:
        common = torch.promote_types(anchors.dtype, keys.dtype)
        anchors, keys = anchors.to(common), keys.to(common)
    if anchors.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"triton_sample: features must be bf16, fp16 or fp32, got {anchors.dtype}")

    compiled = anchors.is_cuda and not interpreting
    block_m, block_n, block_k, num_warps, num_stages = _blocks(b, d, anchors.dtype, compiled, tile_size)
    m_blocks, n_tiles = triton.cdiv(b, block_m), triton.cdiv(n, block_n)
    if splits is None:
        programs = PROGRAMS_PER_SM * _sm_count(device.index or 0) if compiled else INTERPRETER_PROGRAMS
        splits = triton.cdiv(programs, m_blocks)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles, MAX_GRID_Y)))
    splits = triton.cdiv(n_tiles, tiles_per_split)

    part = [torch.empty(splits, b, dtype=dt, device=device)
            for dt in (torch.float32, torch.int32, torch.float32, torch.int32, torch.int32, torch.float32)]
    params = _scalar_params(stats, cfg, device)
    valid_arg = params if valid is None else valid.to(device=device, dtype=torch.uint8).contiguous()  # params: unused
    stream32 = stream - (1 << 32) if stream >= 1 << 31 else stream  # the same 32 bits as a signed int32 argument
    _fne_partial_kernel[(m_blocks, splits)](
        anchors, keys, pos_sims.contiguous(), anchor_ids.long().contiguous(), key_ids.long().contiguous(), valid_arg, params,
        *part,
        b, n, d, anchors.stride(0), anchors.stride(1), keys.stride(0), keys.stride(1), tiles_per_split,
        stream32, row_offset, cfg.margin, -cfg.tau, math.log(cfg.prior_ratio - 1),
        math.log((1 - cfg.false_margin) / cfg.false_margin),
        MODE=MODE_CODES[cfg.mode], CUTDOWN=CUTDOWN_CODES[cfg.cutdown], HAS_VALID=valid is not None,
        INPUT_PRECISION="ieee" if anchors.dtype == torch.float32 else "tf32",  # only read for fp32 operands
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    combine_block = min(1024, triton.next_power_of_2(b))
    _fne_combine_kernel[(triton.cdiv(b, combine_block),)](
        *part, index, fallback, survivors, weight_sum, b, splits, BLOCK=combine_block,
    )
    return result
