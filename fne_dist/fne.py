"""The public FNE API: configuration, statistics, the elementwise rule and negative sampling."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from fne_dist import rng
from fne_dist.sample_result import NO_NEGATIVE, SAMPLE_BLOCK, SampleResult
from fne_dist.sampler import dense_sample, merge_samples, streaming_sample
from fne_dist.stats import SimilarityStats
from fne_dist.weights import IMPLS, FNEConfig, fne_weights, true_negative_prob

__all__ = ["FNEConfig", "SimilarityStats", "SampleResult", "fne_weights", "true_negative_prob", "sample_negatives",
           "merge_samples", "NO_NEGATIVE", "SAMPLE_BLOCK"]


def sample_negatives(anchors: torch.Tensor, keys: torch.Tensor | Sequence[torch.Tensor], pos_sims: torch.Tensor,
                     anchor_ids: torch.Tensor, key_ids: torch.Tensor, stats: SimilarityStats, cfg: FNEConfig, *,
                     seed: int = 0, step: int = 0, direction: int | Sequence[int] = 0, row_offset: int = 0,
                     col_offset: int = 0, valid: torch.Tensor | None = None, impl: str = "auto",
                     tile_size: int | None = None, compile: bool | None = None) -> SampleResult:
    """One negative per anchor, drawn with probability w / sum(w) (FNE_SPEC step 7), no gradient.

    anchors [B, D], keys [N, D] (the candidates), pos_sims [B], anchor_ids [B], key_ids [N], valid [N] bool.
    `row_offset` is this rank's first global anchor row and `col_offset` the global column of keys[0]; (seed, step,
    direction, global row, global column) key the random numbers of every impl, and `index` is a global column
    (NO_NEGATIVE for a row that gets none).  Results over disjoint candidate parts combine with `merge_samples`.
    "torch" and "triton" never materialise [B, N].
    impl: "dense" (reference), "torch" (streaming tiles), "triton" (fused kernel, CUDA),
    "auto" (triton on CUDA, torch otherwise). `tile_size`: candidates per tile (rounded up to a multiple of
    SAMPLE_BLOCK; for "triton" a power of two >= SAMPLE_BLOCK).  `compile` ("torch" on the CPU): run the tiles
    through torch.compile (None: tiles of `sampler.COMPILE_MIN_ELEMENTS` and more; see `sampler.compiled_step`).

    Both directions of a step in one call (the trainer's draw: one pass over the candidates, one tile step for
    both on the CPU): anchors [K, B, D], keys a sequence of K [N, D] (each direction's candidates, views of the same
    ring), pos_sims [K, B], direction a sequence of K; the candidates' ids, validity and columns are shared, and
    every field of the result is [K, B], the draws of K calls.
    """
    if impl not in IMPLS:
        raise ValueError(f"sample_negatives impl={impl!r} is unknown: use one of {IMPLS}")
    several = anchors.dim() == 3
    if not several:
        anchors, keys, pos_sims, direction = anchors[None], (keys,), pos_sims[None], (direction,)
    keys, directions = tuple(keys), tuple(direction)
    if not len(anchors) == len(keys) == len(directions) == len(pos_sims):
        raise ValueError(f"sample_negatives: anchors of {len(anchors)} directions, keys of {len(keys)}, pos_sims of "
                         f"{len(pos_sims)} and {len(directions)} directions: give each direction all four")
    if any(anchors.shape[-1] != k.shape[1] for k in keys):
        raise ValueError(f"anchors are {anchors.shape[-1]}-d but keys are {keys[0].shape[1]}-d: both must share D")
    if impl == "auto":
        impl = "triton" if anchors.is_cuda else "torch"
    streams = [rng.stream_key(seed, step, d) for d in directions]
    common = dict(row_offset=row_offset, col_offset=col_offset, valid=valid)
    with torch.no_grad():
        if impl == "torch":  # one tile step over every direction's rows
            result = streaming_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats, cfg, stream=streams,
                                      tile_size=tile_size, compile=compile, **common)
            return result if several else result.map(lambda t: t[0])
        if impl == "dense":
            one = partial(dense_sample, **common)
        else:
            from fne_kernels import triton_sample

            one = partial(triton_sample, tile_size=tile_size, **common)
        parts = [one(a, k, p, anchor_ids, key_ids, stats, cfg, stream=s)
                 for a, k, p, s in zip(anchors, keys, pos_sims, streams)]
    return SampleResult.stack(parts) if several else parts[0]
