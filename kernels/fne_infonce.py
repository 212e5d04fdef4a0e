"""The posterior-weighted InfoNCE in Triton (FNE_SPEC "Beyond the released rule"): a provider of the partials that
`fne_dist.infonce` combines (`lse_partials` / `pull_partials` there are the torch tiles' form), for one candidate
run against a block of anchors, never writing an [anchors x candidates] array.  `fne_dist.infonce` calls it per run
where `impl` picks the kernels ("triton", or "auto" on CUDA): one autograd path serves one run on one process, the
replicated buffer's several runs (batch and queue segments) and the sharded buffer (every rank its shard's runs
against all G anchors, the partials exchanged).

Per row i and candidate j (momentum keys k_j, similarity s_ij, logit scale t) the logit is
t s_ij + log(1 - f_ij), with log(1 - f) = -softplus(x) and the log-odds x = (a d + b) d + c, d = s - mu+
(`fne_dist.weights.log_odds_coefficients`: one transcendental pair per candidate instead of two densities), and -inf
off the candidate set (the anchor's own id, invalid slots).  Everything runs in log2 units: compiled, exp2 and log2
are the bare approximate instructions (one MUFU each, ~2 ulp, results below 2^-126 flushed to 0: terms that small
do not move a sum that holds a 1), three per candidate in the forward and in the backward; the interpreter uses
tl.exp2 and tl.log2.

1. `_forward_kernel`, grid = anchor blocks x candidate splits: each program streams its candidate tiles (the
   similarity tile by `fne_sampler._similarities`, `tl.dot` over BLOCK_K chunks, fp32 accumulation) and keeps per row
   an online log-sum-exp (running max m, sum of exp2(z - m)) and the same sum over labelled false negatives.
   `triton_lse_partials` merges the splits exactly (`fne_dist.losses.merge_partials` in base 2) and returns the
   run's partials in the natural-log units of `fne_dist.infonce.lse_partials`: [n, 3] = (running max, sum of
   exp(logit - max), that sum over labelled false negatives); sum_j exp2(z_j - m) = sum_j exp(logit_j - m ln 2), so
   only the max is converted.
2. `_backward_kernel`, grid = anchor blocks x feature chunks x candidate splits: the second pass, as attention kernels
   do: it recomputes each tile's logits, P_ij = exp2(z_ij - lse_i) (the natural log-sum-exp times log2(e)), and
   accumulates sum_j P_ij k_j (a second `tl.dot`, on the keys' BLOCK_D columns of its feature chunk) and
   sum_j P_ij s_ij (the logit scale's gradient).  `triton_pull_partials` sums the splits: [n, D + 1], as
   `fne_dist.infonce.pull_partials`.

Masked slots never produce NaN: a row whose candidates in a split are all excluded keeps m = -inf and sum 0 (the
exponent is taken against a max of 0 there), and such a split weighs 0 in the merge.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fne_dist.losses import merge_partials
from triton.language.extra import libdevice

from fne_kernels.fne_sampler import Blocks, _dot_dtype, _exp2, _similarities, _sm_count, fit_k

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
# On sm_90, by operand bytes; tiles that compile without register spills (python -m fne_kernels.compile_check
# --kernel infonce); not yet timed on a GPU (kernels/gpu_check.sh measures them).  Backward: the blocks, and
# BLOCK_D, the output columns one program accumulates: each feature chunk recomputes the similarity tile, so bf16
# holds all 512 columns of D=512 (64 x 512 fp32 accumulators, 255 registers; 128 columns took 4 recomputations).
FORWARD_CONFIGS = {2: Blocks(128, 128, 64, 8, 3), 4: Blocks(64, 128, 32, 8, 2)}
BACKWARD_CONFIGS = {2: (Blocks(64, 64, 64, 8, 2), 512), 4: (Blocks(64, 64, 32, 8, 2), 64)}
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4
MAX_GRID = 65535  # CUDA's limit on the second and third grid dimensions


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2(x); compiled: libdevice's fast_log2f (one MUFU.LG2, ~2 ulp) instead of the accurate lg2 sequence."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _logits(s, cols, cols_in, aid, kid_ptr, valid_ptr, params_ptr, t2, N, FAST: tl.constexpr):
    """(z, excluded) of a tile: z = log2(e) (t s + log(1 - f)), -inf where excluded (the anchor's own id, invalid
    slots, columns past N); params = [mu+, a, b, c] of `log_odds_coefficients` with a, b, c times log2(e),
    t2 = log2(e) t."""
    excluded = (aid[:, None] == tl.load(kid_ptr + cols_in)[None, :]) | (tl.load(valid_ptr + cols_in) == 0)[None, :]
    excluded = excluded | (cols >= N)[None, :]
    mean_pos = tl.load(params_ptr)
    qa, qb, qc = tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3)
    d = s - mean_pos
    x = tl.fma(tl.fma(d, qa, qb), d, qc)  # log2 of the odds of a false negative
    softplus = tl.maximum(x, 0.0) + _log2(1.0 + _exp2(-tl.abs(x), FAST), FAST)  # log2(1 + 2^x), finite for any x
    return tl.where(excluded, float("-inf"), t2 * s - softplus), excluded


@triton.jit
def _tile_logits(t, a_ptr, k_ptr, kid_ptr, valid_ptr, params_ptr, rows_in, aid, t2, N, D, stride_am, stride_ak,
                 stride_kn, stride_kk, FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Candidate tile t against the anchor block, as both passes see it: (cols_in, s, z, excluded) with the columns
    clamped to N - 1 (loads without masks; columns past N are excluded), the similarities and the logits (`_logits`)."""
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_in = tl.minimum(cols, N - 1)
    s = _similarities(a_ptr, k_ptr, rows_in, cols_in, D, stride_am, stride_ak, stride_kn, stride_kk,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INPUT_PRECISION)
    z, excluded = _logits(s, cols, cols_in, aid, kid_ptr, valid_ptr, params_ptr, t2, N, FAST)
    return cols_in, s, z, excluded


@triton.jit
def _forward_kernel(
    a_ptr, k_ptr, aid_ptr, kid_ptr, valid_ptr, params_ptr, scale_ptr, alab_ptr, klab_ptr,
    max_ptr, sum_ptr, false_ptr,
    B, N, D, stride_am, stride_ak, stride_kn, stride_kk, TILES_PER_SPLIT,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row of the anchor block, over this split's candidate tiles: running max, sum of exp2(z - max), and that
    sum over labelled false negatives (their label is the anchor's, >= 0); stored at [split, row]."""
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = tl.minimum(rows, B - 1)
    aid = tl.load(aid_ptr + rows_in)
    alab = tl.load(alab_ptr + rows_in)
    t2 = tl.load(scale_ptr)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    false_mass = tl.zeros([BLOCK_M], tl.float32)
    first = pid_s * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, tl.cdiv(N, BLOCK_N))):
        cols_in, _, z, excluded = _tile_logits(t, a_ptr, k_ptr, kid_ptr, valid_ptr, params_ptr, rows_in, aid, t2, N, D,
                                               stride_am, stride_ak, stride_kn, stride_kk, FAST, BLOCK_M, BLOCK_N,
                                               BLOCK_K, EVEN_K, INPUT_PRECISION)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all excluded so far: exp2(-inf - 0) = 0
        e = _exp2(z - m_safe[:, None], FAST)
        klab = tl.load(klab_ptr + cols_in)[None, :]
        false_neg = ~excluded & (klab >= 0) & (klab == alab[:, None])
        alpha = tl.exp2(m - m_safe)
        total = total * alpha + tl.sum(e, axis=1)
        false_mass = false_mass * alpha + tl.sum(tl.where(false_neg, e, 0.0), axis=1)
        m = m_new
    out = pid_s * B + rows
    row_ok = rows < B
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, total, mask=row_ok)
    tl.store(false_ptr + out, false_mass, mask=row_ok)


@triton.jit
def _backward_kernel(
    a_ptr, k_ptr, aid_ptr, kid_ptr, valid_ptr, params_ptr, scale_ptr, lse_ptr,
    pull_ptr,
    B, N, D, stride_am, stride_ak, stride_kn, stride_kk, TILES_PER_SPLIT,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row of the anchor block, over this split's candidate tiles, with P = exp2(z - lse) (lse in log2 units):
    sum_j P_ij k_j on the feature columns [pid_d BLOCK_D, + BLOCK_D) into pull [split, row, :D], and (first feature
    chunk only) sum_j P_ij s_ij into pull [split, row, D]."""
    pid_m, pid_d, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = tl.minimum(rows, B - 1)
    aid = tl.load(aid_ptr + rows_in)
    lse = tl.load(lse_ptr + rows_in)
    t2 = tl.load(scale_ptr)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    pull = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pull_sim = tl.zeros([BLOCK_M], tl.float32)
    first = pid_s * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, tl.cdiv(N, BLOCK_N))):
        cols_in, s, z, _ = _tile_logits(t, a_ptr, k_ptr, kid_ptr, valid_ptr, params_ptr, rows_in, aid, t2, N, D,
                                        stride_am, stride_ak, stride_kn, stride_kk, FAST, BLOCK_M, BLOCK_N, BLOCK_K,
                                        EVEN_K, INPUT_PRECISION)
        p = _exp2(z - lse[:, None], FAST)
        pull_sim += tl.sum(p * s, axis=1)
        k = tl.load(k_ptr + cols_in.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                    mask=d_ok[None, :], other=0.0)
        pull = tl.dot(p.to(k.dtype), k, pull, input_precision=INPUT_PRECISION)
    out = pull_ptr + (pid_s * B + rows).to(tl.int64) * (D + 1)  # rows of D + 1 values
    row_ok = rows < B
    tl.store(out[:, None] + offs_d[None, :], pull, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(out + D, pull_sim, mask=row_ok & (pid_d == 0))


def configs(b: int, d: int, dtype: torch.dtype, compiled: bool) -> tuple[Blocks, Blocks, int]:
    """(forward blocks, backward blocks, BLOCK_D): the tuning tables on the GPU (BLOCK_M capped by the batch, BLOCK_K
    and BLOCK_D by the width); in the interpreter, where every program step costs Python time, blocks as large as the
    shapes allow."""
    fit_m = max(16, triton.next_power_of_2(b))
    if not compiled:
        blocks = Blocks(min(64, fit_m), 128, min(256, fit_k(d)), 4, 1)
        return blocks, blocks, min(256, fit_k(d))
    forward = FORWARD_CONFIGS[dtype.itemsize]
    backward, block_d = BACKWARD_CONFIGS[dtype.itemsize]
    return (*(blocks._replace(block_m=min(blocks.block_m, fit_m), block_k=min(blocks.block_k, fit_k(d)))
              for blocks in (forward, backward)), min(block_d, fit_k(d)))


def _splits(m_blocks: int, n_tiles: int, programs: int) -> tuple[int, int]:
    """(splits, tiles per split) so that about `programs` programs share the candidates."""
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(programs // max(m_blocks, 1), n_tiles, MAX_GRID)))
    return max(1, triton.cdiv(n_tiles, max(tiles_per_split, 1))), max(tiles_per_split, 1)


class _Operands:
    """What both kernels read for one candidate run against anchors [n, D]: `inputs`, their first arguments (the
    product's operands: the anchors cast to the narrower of the two dtypes, `_dot_dtype`, the keys as they lie; the
    ids, the validity, the posterior's coefficients and the logit scale in log2 units), the launch shape and
    constants."""

    def __init__(self, anchors, scale, run, anchor_ids, coefficients, programs):
        keys = run.keys
        if not (anchors.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("the posterior InfoNCE's Triton kernels need CUDA tensors; on the CPU use impl='torch', "
                               "or set TRITON_INTERPRET=1 before fne_kernels.fne_infonce is imported (slow, for tests)")
        if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
            raise ValueError(f"the posterior InfoNCE's Triton kernels need anchors [n, D] and keys [N, D]; got "
                             f"{tuple(anchors.shape)} and {tuple(keys.shape)}")
        for name, x in (("anchors", anchors), ("keys", keys)):
            if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise ValueError(f"the posterior InfoNCE's Triton kernels: {name} must be bf16, fp16 or fp32, got "
                                 f"{x.dtype}")
        self.device = device = anchors.device
        self.compiled = anchors.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
        a = anchors.detach().to(_dot_dtype(anchors, keys))
        valid = torch.ones_like(run.ids, dtype=torch.bool) if run.valid is None else run.valid
        self.inputs = (a, keys.detach(), self.long(anchor_ids), self.long(run.ids),
                       valid.to(device).contiguous().view(torch.uint8),
                       torch.cat([coefficients[:1], coefficients[1:] * LOG2E]).float(),  # log2 units, mu+ as it is
                       (scale.detach().float() * LOG2E).reshape(1).contiguous())  # log2(e) t
        b, d = anchors.shape
        self.forward, self.backward, self.block_d = configs(b, d, a.dtype, self.compiled)
        if programs is None:
            programs = PROGRAMS_PER_SM * _sm_count(device.index or 0) if self.compiled else INTERPRETER_PROGRAMS
        self.programs = programs
        self.shape = (b, keys.shape[0], d, a.stride(0), a.stride(1), keys.stride(0), keys.stride(1))
        self.precision = "ieee" if a.dtype == torch.float32 else "tf32"  # only read for fp32 operands

    def long(self, index: torch.Tensor) -> torch.Tensor:
        return index.to(device=self.device, dtype=torch.long).contiguous()

    def splits(self, blocks: Blocks, programs_per_split: int) -> tuple[int, int]:
        """(splits, tiles per split) of the candidates for a grid of `programs_per_split` programs per split."""
        return _splits(programs_per_split, triton.cdiv(self.shape[1], blocks.block_n), self.programs)

    def constants(self, blocks: Blocks) -> dict:
        return dict(EVEN_K=self.shape[2] % blocks.block_k == 0, INPUT_PRECISION=self.precision, FAST=self.compiled,
                    BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
                    num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def triton_lse_partials(anchors: torch.Tensor, scale: torch.Tensor, run, anchor_ids: torch.Tensor,
                        anchor_labels: torch.Tensor, coefficients: torch.Tensor, programs: int | None = None
                        ) -> torch.Tensor:
    """`fne_dist.infonce.lse_partials` of one candidate run by `_forward_kernel`: [n, 3] fp32 per anchor of anchors
    [n, D] (any strides) over `run` (a `fne_dist.infonce.Candidates`: keys [N, D], ids, labels [N], valid [N] or
    None), in natural-log units: the largest logit (-inf: none), the sum of exp(logit - it), the same sum over
    labelled false negatives.  scale: the logit scale (one element); coefficients: `log_odds_coefficients`.

    anchors and keys in bf16, fp16 or fp32 (the product runs in the narrower dtype, fp32 accumulation); `programs`:
    about how many programs share the candidates (default PROGRAMS_PER_SM per SM).  CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1 (set before fne_kernels.fne_infonce is imported)."""
    ops = _Operands(anchors, scale, run, anchor_ids, coefficients, programs)
    n = len(anchors)
    if n == 0 or len(run.ids) == 0:
        return torch.tensor([float("-inf"), 0.0, 0.0], device=ops.device).repeat(n, 1)
    m_blocks = triton.cdiv(n, ops.forward.block_m)
    splits, per_split = ops.splits(ops.forward, m_blocks)
    partials = torch.empty(3, splits, n, dtype=torch.float32, device=ops.device)  # max, sum, false sum
    _forward_kernel[(m_blocks, splits)](*ops.inputs, ops.long(anchor_labels), ops.long(run.labels), *partials,
                                        *ops.shape, per_split, **ops.constants(ops.forward))
    merged = merge_partials(partials.permute(1, 2, 0), torch.exp2)  # the splits, exactly, in log2 units
    merged[:, 0] *= LN2  # sum_j exp2(z_j - m) = sum_j exp(logit_j - m ln 2): only the max changes units
    return merged


def triton_pull_partials(anchors: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor, run, anchor_ids: torch.Tensor,
                         coefficients: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """`fne_dist.infonce.pull_partials` of one candidate run by `_backward_kernel`: [n, D + 1] fp32 per anchor of
    anchors [n, D] with log-sum-exp lse [n] (natural log): over `run`, sum_j P_ij k_j and sum_j P_ij s_ij
    (P: the softmax).  Arguments as `triton_lse_partials`."""
    ops = _Operands(anchors, scale, run, anchor_ids, coefficients, programs)
    n, d = anchors.shape
    if n == 0 or len(run.ids) == 0:
        return torch.zeros(n, d + 1, dtype=torch.float32, device=ops.device)
    m_blocks, d_blocks = triton.cdiv(n, ops.backward.block_m), triton.cdiv(d, ops.block_d)
    splits, per_split = ops.splits(ops.backward, m_blocks * d_blocks)
    pull = torch.empty(splits, n, d + 1, dtype=torch.float32, device=ops.device)
    lse2 = (lse.float() * LOG2E).contiguous()  # the kernel's log2 units
    _backward_kernel[(m_blocks, d_blocks, splits)](*ops.inputs, lse2, pull, *ops.shape, per_split,
                                                   BLOCK_D=ops.block_d, **ops.constants(ops.backward))
    return pull.sum(0)
