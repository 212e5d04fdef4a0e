"""The interface every objective implements: one step's loss and diagnostics from the step's features."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.buffer import NegativeBuffer
from fne_dist.config import FNESection
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig


@dataclass
class StepFeatures:
    """What a step hands its objective.  ia, ta [b, D]: this rank's online features (with gradient); ik, tk [b, D]:
    its keys, constants (the momentum towers', or with fne.keys=online ia and ta detached); ids [b]: identity keys,
    never negatives of each other when equal (the image ids; the labels under fne.oracle:
    `fne_dist.objective.identity_keys`); labels [b]; keys: the global batch's keys (all ranks, the same identity
    keys); stats: the statistics to weigh with (this step's, or the kept ones during a warm-up); logit_scale: exp of
    the model's logit scale (with gradient) for objectives with a temperature, else None; epoch: the training epoch
    (0-based) for objectives that switch a term on at an epoch, None where the caller has no epochs (such objectives
    refuse it)."""

    ia: torch.Tensor
    ta: torch.Tensor
    ik: torch.Tensor
    tk: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    keys: GlobalKeys
    stats: SimilarityStats
    step: int
    rank: int
    logit_scale: torch.Tensor | None
    epoch: int | None = None


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # 0-dim, with gradient
    diagnostics: torch.Tensor  # [len(DIAGNOSTICS)] float64 sums over this rank's anchors (both directions)
    index: torch.Tensor | None = None  # [2, b] drawn global columns per direction, for objectives that sample


class StepObjective:
    """One objective.  `scaled`: it uses the model's logit scale (a temperature; otherwise the trainer freezes it).
    `warmup`: the class that replaces it during fne.warmup_epochs, or None (no warm-up).  `reads_keys`: it reads the
    keys' features (ik, tk, the global batch's keys), so that fne.keys=momentum runs the momentum towers for it (an
    objective that reads only ids runs none: a second forward for nothing).  `reads_buffer`: it reads the negative
    buffer, so that each rank holds its part of one (fne.queue_size keys: 2 GiB a rank at laion's 2^20 x 512 bf16,
    which an in-batch objective would only fill, enqueue and checkpoint)."""

    scaled = False
    warmup: type[StepObjective] | None = None
    reads_keys = False
    reads_buffer = False

    @classmethod
    def uses_posterior(cls, cfg: FNESection) -> bool:
        """Whether it weighs by FNE's posterior under `cfg` (which switches on above fne.min_count positives: the
        log says when, and warns where it cannot)."""
        return False

    def __init__(self, cfg: FNESection, rule: FNEConfig, buffer: NegativeBuffer | None, seed: int):
        self.cfg, self.rule, self.buffer, self.seed = cfg, rule, buffer, seed

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        raise NotImplementedError
