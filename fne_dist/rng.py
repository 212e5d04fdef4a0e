"""Counter-based random numbers shared by every sampler implementation (the one torch statement of the hash).

The two-level sampler needs two uniforms per (anchor row, sampling block): one for the race between blocks, one
for the inverse-CDF draw inside the winning block.  Both are a pure function of (stream, global row, global first
column of the block), so a draw does not depend on the tile size, the number of programs, the device or how the
rows and candidates are split across calls and ranks.

The generator.  A stream is 64 bits: `stream_key(seed, step, direction)` is the bijective 64-bit finaliser
`mix64` (SplitMix64's, Stafford's variant 13) of mix64(seed) + 2 * step + direction, so for one seed no two
(step, direction) pairs below 2^63 share a stream (not merely "unlikely": the map is injective).  The counter is
the 64-bit word (row << 32) | block column; its bits are mix64(mix64(counter ^ stream) ^ stream2), with stream2 =
mix64(stream ^ GOLDEN64): two full rounds of a bijection with complete avalanche, so within a stream distinct
(row, block) pairs never share bits.  The race uniform takes the top 23 bits, the pick uniform bits 9..31:
u = (x + 0.5) * 2^-23, exact in fp32 and never 0 or 1.  SplitMix64's output function passes BigCrush / PractRand
on a counter; the resolution 2^-23 bounds how closely the law of the draw can follow w / W (an absolute error of
about 1e-7 in each probability).  Rows and block columns must stay below 2^32.

On tensors the hash runs in int64: multiplications wrap modulo 2^64 (two's complement, as torch's CPU and CUDA
integer kernels do; a test checks the bits against the Python-int reference) and right shifts are made logical by
masking.  It runs once per (row, block), not per candidate, so its cost is small.  The Triton kernel computes the
same bits in uint64 (`fne_kernels.fne_sampler._counter_bits`; a test checks them against `block_bits`).
"""
from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
GOLDEN64 = 0x9E3779B97F4A7C15
UNIFORM_BITS = 23


def _signed64(x: int) -> int:
    """The int64 value with the same 64 bits as x."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64_int(z: int) -> int:
    """The finaliser on a Python int (for deriving streams on the host, and the tests' reference)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


MIX1_I64, MIX2_I64 = _signed64(MIX1), _signed64(MIX2)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """The finaliser on an int64 tensor (its bit pattern is the uint64 value)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * MIX1_I64
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * MIX2_I64
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def stream_key(seed: int, step: int = 0, direction: int = 0) -> int:
    """The 64-bit stream of (seed, training step, direction: 0 image->text, 1 text->image)."""
    if direction not in (0, 1):
        raise ValueError(f"stream_key direction={direction}: use 0 (image->text) or 1 (text->image)")
    return mix64_int(mix64_int(seed) + 2 * step + direction)


def stream_words(stream: int) -> tuple[int, int]:
    """The two keys of the counter hash as signed int64 values (kernel arguments)."""
    return _signed64(stream), _signed64(mix64_int(stream ^ GOLDEN64))


def stream_tensor(*streams: int) -> torch.Tensor:
    """`stream_words` as a CPU int64 tensor: [2] for one stream, [K, 2] for K (the directions of one call).  How a
    compiled tile step takes streams (a Python int argument would be specialised on, and recompiled at every
    step); one stream's 0-dim halves act as scalars on any device."""
    words = torch.tensor([stream_words(s) for s in streams], dtype=torch.int64)
    return words[0] if len(streams) == 1 else words


def block_bits(stream: int | torch.Tensor, rows: torch.Tensor, block_cols: torch.Tensor) -> torch.Tensor:
    """The 64 hash bits of (rows x block_cols) as int64 [len(rows), len(block_cols)]; `stream`: the 64-bit stream
    or its `stream_tensor`.  K streams ([K, 2]): the rows under each stream in turn, [K * len(rows), ...]."""
    if isinstance(stream, torch.Tensor) and stream.dim() == 2:
        return torch.cat([block_bits(words, rows, block_cols) for words in stream])
    key1, key2 = stream_words(stream) if isinstance(stream, int) else stream
    counter = (rows.to(torch.int64) << 32)[:, None] | block_cols.to(torch.int64)[None, :]
    return mix64(mix64(counter ^ key1) ^ key2)


def _uniform(bits: torch.Tensor, shift: int) -> torch.Tensor:
    x = (bits >> shift) & ((1 << UNIFORM_BITS) - 1)
    return x.to(torch.float32).add_(0.5).mul_(1.0 / (1 << UNIFORM_BITS))


def block_uniforms(stream: int | torch.Tensor, rows: torch.Tensor,
                   block_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(race, pick) fp32 uniforms in (0, 1) of shape [len(rows), len(block_cols)] (K streams: [K * len(rows), ...],
    as `block_bits`): the race uniform from the top 23 bits, the pick uniform from bits 9..31."""
    bits = block_bits(stream, rows, block_cols)
    return _uniform(bits, 64 - UNIFORM_BITS), _uniform(bits, 32 - UNIFORM_BITS)
