"""The posterior-weighted InfoNCE in Triton (FNE_SPEC "Beyond the released rule"): `fne_dist.infonce.posterior_infonce`
fused, forward and backward, never writing an [anchors x candidates] array.

Per row i and candidate j (momentum keys k_j, similarity s_ij, logit scale t) the logit is
t s_ij + log(1 - f_ij), with log(1 - f) = -softplus(x) and the log-odds x = (a d + b) d + c, d = s - mu+
(`fne_dist.weights.log_odds_coefficients`: one transcendental pair per candidate instead of two densities), and -inf
off the candidate set (the anchor's own id, invalid slots).  Everything runs in log2 units: compiled, exp2 and log2
are the bare approximate instructions (one MUFU each, ~2 ulp, results below 2^-126 flushed to 0: terms that small
do not move a sum that holds a 1), three per candidate in the forward and in the backward; the interpreter uses
tl.exp2 and tl.log2.

1. `_forward_kernel`, grid = anchor blocks x candidate splits: each program streams its candidate tiles (the
   similarity tile by `fne_sampler._similarities`: `tl.dot` over BLOCK_K chunks, fp32 accumulation) and keeps per row an online log-sum-exp
   (running max m, sum of exp2(z - m)) and the same sum over labelled false negatives.  The host combines the
   splits' partials with the positive logit (exactly: rescaled to the common max).
2. `_backward_kernel`, grid = anchor blocks x feature chunks x candidate splits: the second pass, as attention kernels
   do: it recomputes each tile's logits, P_ij = exp2(z_ij - lse_i), and accumulates sum_j P_ij k_j (a second
   `tl.dot`, on the keys' BLOCK_D columns of its feature chunk) and sum_j P_ij s_ij (the logit scale's gradient).
   The host sums the splits and forms the gradients with `fne_dist.infonce.infonce_gradients`, as the torch path.

Masked slots never produce NaN: a row whose candidates in a split are all excluded keeps m = -inf and sum 0 (the
exponent is taken against a max of 0 there), and every row's log-sum-exp holds its positive, so it is finite.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from fne_dist.losses import infonce_gradients
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, log_odds_coefficients
from triton.language.extra import libdevice

from fne_kernels.fne_sampler import Blocks, _dot_dtype, _exp2, _similarities, fit_k

LOG2E = 1.0 / math.log(2.0)
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
    a_ptr, k_ptr, aid_ptr, alab_ptr, kid_ptr, klab_ptr, valid_ptr, params_ptr, scale_ptr,
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
    pull_ptr, pull_sim_ptr,
    B, N, D, stride_am, stride_ak, stride_kn, stride_kk, TILES_PER_SPLIT,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row of the anchor block, over this split's candidate tiles, with P = exp2(z - lse) (lse in log2 units):
    sum_j P_ij k_j on the feature columns [pid_d BLOCK_D, + BLOCK_D) into pull [split, row, :], and (first feature
    chunk only) sum_j P_ij s_ij into pull_sim [split, row]."""
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
    out = pid_s * B + rows
    row_ok = rows < B
    tl.store(pull_ptr + out.to(tl.int64)[:, None] * D + offs_d[None, :], pull, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(pull_sim_ptr + out, pull_sim, mask=row_ok & (pid_d == 0))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


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


class _Launch:
    """What both kernels read: the operands in the product's dtype, the index tensors, the coefficients, the grid."""

    def __init__(self, anchors, scale, cand, stats, cfg, programs):
        b, d = anchors.shape
        n = cand.keys.shape[0]
        self.device = anchors.device
        self.compiled = anchors.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
        self.anchors = anchors.detach().to(_dot_dtype(anchors, cand.keys))
        self.keys = cand.keys.detach()
        self.scale = (scale.detach().float() * LOG2E).reshape(1).contiguous()  # log2(e) t
        self.index = [x.to(device=self.device, dtype=dt).contiguous() for x, dt in (
            (cand.anchor_ids, torch.long), (cand.anchor_labels, torch.long), (cand.key_ids, torch.long),
            (cand.key_labels, torch.long), (cand.valid, torch.uint8))]
        coefficients = log_odds_coefficients(stats, cfg, self.device)
        self.params = torch.cat([coefficients[:1], coefficients[1:] * LOG2E])  # log2 units, mu+ as it is
        self.forward, self.backward, self.block_d = configs(b, d, self.anchors.dtype, self.compiled)
        if programs is None:
            programs = PROGRAMS_PER_SM * _sm_count(self.device.index or 0) if self.compiled else INTERPRETER_PROGRAMS
        self.programs = programs
        self.shape = (b, n, d, self.anchors.stride(0), self.anchors.stride(1), self.keys.stride(0), self.keys.stride(1))
        self.precision = "ieee" if self.anchors.dtype == torch.float32 else "tf32"  # only read for fp32 operands

    def run_forward(self):
        b, n, d = self.shape[:3]
        blocks = self.forward
        m_blocks = triton.cdiv(b, blocks.block_m)
        splits, per_split = _splits(m_blocks, triton.cdiv(n, blocks.block_n), self.programs)
        partials = [torch.empty(splits, b, dtype=torch.float32, device=self.device) for _ in range(3)]
        if b == 0:
            return partials
        aid, alab, kid, klab, valid = self.index
        _forward_kernel[(m_blocks, splits)](
            self.anchors, self.keys, aid, alab, kid, klab, valid, self.params, self.scale, *partials, *self.shape,
            per_split, EVEN_K=d % blocks.block_k == 0, INPUT_PRECISION=self.precision, FAST=self.compiled,
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, num_warps=blocks.num_warps,
            num_stages=blocks.num_stages)
        return partials

    def run_backward(self, lse2):
        b, n, d = self.shape[:3]
        blocks = self.backward
        m_blocks, d_blocks = triton.cdiv(b, blocks.block_m), triton.cdiv(d, self.block_d)
        splits, per_split = _splits(m_blocks * d_blocks, triton.cdiv(n, blocks.block_n), self.programs)
        pull = torch.empty(splits, b, d, dtype=torch.float32, device=self.device)
        pull_sim = torch.empty(splits, b, dtype=torch.float32, device=self.device)
        if b == 0:
            return pull.sum(0), pull_sim.sum(0)
        aid, _, kid, _, valid = self.index
        _backward_kernel[(m_blocks, d_blocks, splits)](
            self.anchors, self.keys, aid, kid, valid, self.params, self.scale, lse2.contiguous(), pull, pull_sim,
            *self.shape, per_split, EVEN_K=d % blocks.block_k == 0, INPUT_PRECISION=self.precision, FAST=self.compiled,
            BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, BLOCK_D=self.block_d,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        return pull.sum(0), pull_sim.sum(0)


class _TritonPosteriorInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, scale, pos_keys, cand, stats, cfg, programs):
        launch = _Launch(anchors, scale, cand, stats, cfg, programs)
        t = scale.detach().float()
        pos = (anchors.detach().float() * pos_keys.float()).sum(1)
        pos2 = pos * t.reshape(()) * LOG2E
        row_max, row_sum, false_sum = launch.run_forward()
        top = torch.maximum(pos2, row_max.amax(0))  # finite: the positive's logit
        rescale = torch.exp2(row_max - top)  # 0 for splits whose candidates were all excluded
        total = torch.exp2(pos2 - top) + (row_sum * rescale).sum(0)
        false_prob = (false_sum * rescale).sum(0) / total
        lse2 = top + torch.log2(total)
        ctx.save_for_backward(t, pos_keys, pos, lse2)
        ctx.launch, ctx.dtype = launch, anchors.dtype
        ctx.mark_non_differentiable(false_prob)
        return (lse2 - pos2) / LOG2E, false_prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_false_prob):
        t, pos_keys, pos, lse2 = ctx.saved_tensors
        pull, pull_sim = ctx.launch.run_backward(lse2)
        p_pos = torch.exp2(pos * t.reshape(()) * LOG2E - lse2)
        grad_anchors, grad_scale = infonce_gradients(grad_loss, t, pos_keys, pos, p_pos, pull, pull_sim)
        return grad_anchors.to(ctx.dtype), grad_scale, None, None, None, None, None


def triton_posterior_infonce(anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor, cand,
                             stats: SimilarityStats, cfg: FNEConfig, programs: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels: same arguments and results as `fne_dist.infonce.posterior_infonce` (per-row losses with
    gradients into `anchors` and `scale`, and the softmax mass on labelled false negatives; `cand` a
    `fne_dist.infonce.CandidateSet`, not imported here: fne_dist.infonce dispatches to this module).

    anchors [b, D] and keys [N, D] in bf16, fp16 or fp32 (the product runs in the narrower dtype, fp32
    accumulation); `programs`: about how many programs share the candidates (default PROGRAMS_PER_SM per SM).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (set before fne_kernels.fne_infonce is imported).
    """
    if not (anchors.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError("triton_posterior_infonce needs CUDA tensors; on the CPU use impl='torch', or set "
                           "TRITON_INTERPRET=1 before fne_kernels.fne_infonce is imported (slow, for tests)")
    if anchors.dim() != 2 or cand.keys.dim() != 2 or anchors.shape[1] != cand.keys.shape[1]:
        raise ValueError(f"triton_posterior_infonce needs anchors [b, D] and keys [N, D]; got "
                         f"{tuple(anchors.shape)} and {tuple(cand.keys.shape)}")
    for name, x in (("anchors", anchors), ("keys", cand.keys)):
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"triton_posterior_infonce: {name} must be bf16, fp16 or fp32, got {x.dtype}")
    return _TritonPosteriorInfoNCE.apply(anchors, scale, pos_keys.detach(), cand, stats, cfg, programs)
