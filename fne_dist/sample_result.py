"""What a sampler returns, shared by the torch samplers (`fne_dist.sampler`) and the Triton kernel (`fne_kernels`),
so that the kernel package imports no sampler code."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

SAMPLE_BLOCK = 128  # columns per sampling block (two-level sampler); callers cut candidate parts at multiples of it
NO_NEGATIVE = -1  # `SampleResult.index` of a row that gets no negative


@dataclass
class SampleResult:
    """Per anchor row [B]: index (long, global candidate column; NO_NEGATIVE where the row gets no negative: in
    eliminate mode when every weight is 0, in any mode when no valid non-positive candidate exists), fallback (bool:
    the row had no positive weight and took its hardest candidate, see `fne_dist.weights.fallback_scores`),
    survivors (long: candidates with positive weight), weight_sum (fp32), race_key (fp32: the winning block's race
    key E / W_block, +inf where the weight sum is 0), fallback_score (fp32: the best fallback score, -inf where no
    candidate qualifies) and fallback_index (long: its global column where the weight sum is 0, NO_NEGATIVE
    elsewhere: only rows without weight use it).  The last three let `fne_dist.sampler.merge_samples` combine
    results over disjoint candidate sets exactly."""

    index: torch.Tensor
    fallback: torch.Tensor
    survivors: torch.Tensor
    weight_sum: torch.Tensor
    race_key: torch.Tensor
    fallback_score: torch.Tensor
    fallback_index: torch.Tensor

    @property
    def has_negative(self) -> torch.Tensor:
        return self.index != NO_NEGATIVE

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SampleResult:
        """Every field through `fn`: one direction's rows (`lambda t: t[k]`), a reshape."""
        return SampleResult(*(fn(getattr(self, f.name)) for f in fields(self)))

    @staticmethod
    def stack(parts: Sequence[SampleResult]) -> SampleResult:
        """Results of K calls (directions) as one whose fields are [K, B]."""
        return SampleResult(*(torch.stack([getattr(p, f.name) for p in parts]) for f in fields(SampleResult)))
