"""The public FNE API: configuration, statistics, the elementwise rule and negative sampling."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from fne_dist import rng
from fne_dist.sample_result import NO_NEGATIVE, SAMPLE_BLOCK, SampleResult
from fne_dist.sampler import KeyPart, dense_sample, merge_samples, no_candidates, streaming_sample
from fne_dist.stats import SimilarityStats
from fne_dist.weights import IMPLS, FNEConfig, fne_weights, true_negative_prob

__all__ = ["FNEConfig", "SimilarityStats", "SampleResult", "fne_weights", "true_negative_prob", "sample_negatives",
           "sample_parts", "KeyPart", "merge_samples", "NO_NEGATIVE", "SAMPLE_BLOCK"]


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
    through torch.compile (None: draws of `sampler.COMPILE_MIN_ELEMENTS` anchor-candidate pairs and more; see
    `sampler.compiled_step`).

    Both directions of a step in one call (the trainer's draw: one pass over the candidates, one tile step for
    both on the CPU): anchors [K, B, D], keys a sequence of K [N, D] (each direction's candidates, views of the same
    ring), pos_sims [K, B], direction a sequence of K; the candidates' ids, validity and columns are shared, and
    every field of the result is [K, B], the draws of K calls.
    """
    several = anchors.dim() == 3
    if not several:
        anchors, keys, pos_sims, direction = anchors[None], (keys,), pos_sims[None], (direction,)
    result = sample_parts(anchors, [KeyPart(tuple(keys), key_ids, valid, col_offset)], pos_sims, anchor_ids, stats,
                          cfg, seed=seed, step=step, direction=direction, row_offset=row_offset, impl=impl,
                          tile_size=tile_size, compile=compile)
    return result if several else result.map(lambda t: t[0])


def sample_parts(anchors: torch.Tensor, parts: Sequence[KeyPart], pos_sims: torch.Tensor, anchor_ids: torch.Tensor,
                 stats: SimilarityStats, cfg: FNEConfig, *, seed: int = 0, step: int = 0,
                 direction: Sequence[int] = (0, 1), row_offset: int = 0, impl: str = "auto",
                 tile_size: int | None = None, compile: bool | None = None) -> SampleResult:
    """`sample_negatives` of anchors [K, B, D] over disjoint candidate parts (`KeyPart`s at their global columns,
    each with its K directions' keys: the buffer's segments): fields [K, B], the draw over the parts' union.
    "torch" reads every part in one streaming pass (the batch's part shares the ring's first tile); "dense" and
    "triton" draw each part and direction in its own call and merge the parts (`merge_samples`)."""
    if impl not in IMPLS:
        raise ValueError(f"sample_negatives impl={impl!r} is unknown: use one of {IMPLS}")
    directions = tuple(direction)
    k, b = anchors.shape[0], anchors.shape[1]
    if not len(anchors) == len(directions) == len(pos_sims) or any(len(part.keys) != k for part in parts):
        raise ValueError(f"sample_negatives: anchors of {len(anchors)} directions, keys of "
                         f"{sorted({len(part.keys) for part in parts})}, pos_sims of {len(pos_sims)} and "
                         f"{len(directions)} directions: give each direction all four")
    if any(anchors.shape[-1] != keys.shape[1] for part in parts for keys in part.keys):
        raise ValueError(f"anchors are {anchors.shape[-1]}-d but keys are {parts[0].keys[0].shape[1]}-d: both must "
                         "share D")
    if impl == "auto":
        impl = "triton" if anchors.is_cuda else "torch"
    streams = [rng.stream_key(seed, step, d) for d in directions]
    with torch.no_grad():
        if impl == "torch":  # one tile step over every direction's rows and every part's columns
            return streaming_sample(anchors, parts, pos_sims, anchor_ids, stats, cfg, streams=streams,
                                    row_offset=row_offset, tile_size=tile_size, compile=compile)
        if impl == "dense":
            one = dense_sample
        else:
            from fne_kernels import triton_sample

            one = partial(triton_sample, tile_size=tile_size)
        drawn = [SampleResult.stack([one(a, keys, p, anchor_ids, part.ids, stats, cfg, stream=s, row_offset=row_offset,
                                         col_offset=part.col_offset, valid=part.valid)
                                     for a, keys, p, s in zip(anchors, part.keys, pos_sims, streams)])
                 for part in parts if len(part)]
    if not drawn:
        return no_candidates((k, b), anchors.device)
    return drawn[0] if len(drawn) == 1 else merge_samples(drawn, cfg)
