"""Counter-based random numbers shared by every sampler implementation.

A uniform number is a pure function of (stream, global anchor row, global candidate column), so a draw
does not depend on the tile size, the number of programs, the device or how the buffer is split across
ranks.  The hash is the 32-bit MurmurHash3 finaliser.  On tensors it runs in int32: multiplications wrap
modulo 2^32 (two's complement, as torch's CPU and CUDA integer kernels do; a test checks the bits against
the Python-int reference) and right shifts are made logical by masking.  int32 is about 13x faster than
masked int64 arithmetic, which matters because the hash is most of the streaming sampler's work.  The
Triton kernel computes the same bits in uint32, so both paths draw the same numbers.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX1 = 0x85EBCA6B
MIX2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9


def fmix32_int(h: int) -> int:
    """The finaliser on a Python int (for deriving streams on the host)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * MIX1) & MASK32
    h ^= h >> 13
    h = (h * MIX2) & MASK32
    return h ^ (h >> 16)


def _signed32(x: int) -> int:
    """The int32 value with the same 32 bits as x."""
    x &= MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


MIX1_I32, MIX2_I32, GOLDEN_I32 = _signed32(MIX1), _signed32(MIX2), _signed32(GOLDEN)


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """The finaliser on an int32 tensor (its bit pattern is the uint32 value)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * MIX1_I32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * MIX2_I32
    return h ^ ((h >> 16) & 0xFFFF)


def stream_key(seed: int, step: int = 0, direction: int = 0) -> int:
    """One 32-bit stream per (seed, training step, direction: 0 image->text, 1 text->image)."""
    h = fmix32_int(seed & MASK32)
    h = fmix32_int(h ^ ((seed >> 32) & MASK32))
    h = fmix32_int(h ^ (step & MASK32))
    h = fmix32_int(h ^ ((step >> 32) & MASK32))
    return fmix32_int(h ^ (direction & MASK32))


def row_hash(stream: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-anchor part of the counter: fmix32(stream + row * GOLDEN), int32 bits."""
    return fmix32(rows.to(torch.int32) * GOLDEN_I32 + _signed32(stream))


def col_hash(stream: int, cols: torch.Tensor) -> torch.Tensor:
    """Per-candidate part of the counter: fmix32(col xor stream), int32 bits."""
    return fmix32(cols.to(torch.int32) ^ _signed32(stream))


def uniform_from_hashes(row_bits: torch.Tensor, col_bits: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1), shape [len(row_bits), len(col_bits)], from the top 23 bits of fmix32(row ^ col):
    (x + 0.5) * 2^-23 is exact in fp32 for x < 2^23, so u is never 0 or 1."""
    bits = fmix32(row_bits[:, None] ^ col_bits[None, :])
    return ((bits >> 9) & 0x7FFFFF).to(torch.float32).add_(0.5).mul_(1.0 / (1 << 23))


def uniform(stream: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The uniforms of (rows x cols) in one stream."""
    return uniform_from_hashes(row_hash(stream, rows), col_hash(stream, cols))
