"""Counter-based random numbers shared by every sampler implementation.

A uniform number is a pure function of (stream, global anchor row, global candidate column), so a draw
does not depend on the tile size, the number of programs, the device or how the buffer is split across
ranks.  The hash is the 32-bit MurmurHash3 finaliser, written here in int64 arithmetic masked to 32
bits; the Triton kernel computes the same bits in uint32, so both paths draw the same numbers.
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


def _mul32(h: torch.Tensor, m: int) -> torch.Tensor:
    """(h * m) mod 2^32 in int64 without signed overflow: split h into 16-bit halves."""
    return ((h & 0xFFFF) * m + ((((h >> 16) * m) & 0xFFFF) << 16)) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """The finaliser on an int64 tensor holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, MIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, MIX2)
    return h ^ (h >> 16)


def stream_key(seed: int, step: int = 0, direction: int = 0) -> int:
    """One 32-bit stream per (seed, training step, direction: 0 image->text, 1 text->image)."""
    h = fmix32_int(seed & MASK32)
    h = fmix32_int(h ^ ((seed >> 32) & MASK32))
    h = fmix32_int(h ^ (step & MASK32))
    h = fmix32_int(h ^ ((step >> 32) & MASK32))
    return fmix32_int(h ^ (direction & MASK32))


def row_hash(stream: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-anchor part of the counter: fmix32(stream + row * GOLDEN)."""
    return fmix32((_mul32(rows.long() & MASK32, GOLDEN) + stream) & MASK32)


def col_hash(stream: int, cols: torch.Tensor) -> torch.Tensor:
    """Per-candidate part of the counter: fmix32(col xor stream)."""
    return fmix32((cols.long() & MASK32) ^ stream)


def uniform_from_hashes(row_bits: torch.Tensor, col_bits: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1), shape [len(row_bits), len(col_bits)], from the top 23 bits of fmix32(row ^ col):
    (x + 0.5) * 2^-23 is exact in fp32 for x < 2^23, so u is never 0 or 1."""
    bits = fmix32(row_bits[:, None] ^ col_bits[None, :])
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def uniform(stream: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The uniforms of (rows x cols) in one stream."""
    return uniform_from_hashes(row_hash(stream, rows), col_hash(stream, cols))
