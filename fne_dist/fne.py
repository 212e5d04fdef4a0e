"""The public FNE API: configuration, statistics, the elementwise rule and negative sampling."""
from __future__ import annotations

import torch

from fne_dist import rng
from fne_dist.sample_result import NO_NEGATIVE, SAMPLE_BLOCK, SampleResult
from fne_dist.sampler import dense_sample, merge_samples, streaming_sample
from fne_dist.stats import SimilarityStats
from fne_dist.weights import IMPLS, FNEConfig, fne_weights, true_negative_prob

__all__ = ["FNEConfig", "SimilarityStats", "SampleResult", "fne_weights", "true_negative_prob", "sample_negatives",
           "merge_samples", "NO_NEGATIVE", "SAMPLE_BLOCK"]


def sample_negatives(anchors: torch.Tensor, keys: torch.Tensor, pos_sims: torch.Tensor, anchor_ids: torch.Tensor,
                     key_ids: torch.Tensor, stats: SimilarityStats, cfg: FNEConfig, *, seed: int = 0, step: int = 0,
                     direction: int = 0, row_offset: int = 0, col_offset: int = 0, valid: torch.Tensor | None = None,
                     impl: str = "auto", tile_size: int | None = None, compile: bool | None = None) -> SampleResult:
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
    """
    if impl not in IMPLS:
        raise ValueError(f"sample_negatives impl={impl!r} is unknown: use one of {IMPLS}")
    if anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors are {anchors.shape[1]}-d but keys are {keys.shape[1]}-d: both must share D")
    if impl == "auto":
        impl = "triton" if anchors.is_cuda else "torch"
    stream = rng.stream_key(seed, step, direction)
    with torch.no_grad():
        if impl == "dense":
            return dense_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats, cfg, stream=stream,
                                row_offset=row_offset, col_offset=col_offset, valid=valid)
        if impl == "torch":
            return streaming_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats, cfg, stream=stream,
                                    row_offset=row_offset, col_offset=col_offset, valid=valid, tile_size=tile_size,
                                    compile=compile)
        from fne_kernels import triton_sample

        return triton_sample(anchors, keys, pos_sims, anchor_ids, key_ids, stats, cfg, stream=stream,
                             row_offset=row_offset, col_offset=col_offset, valid=valid, tile_size=tile_size)
