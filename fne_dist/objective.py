"""The loss of one training step from the step's features (FNE_SPEC steps 3-10), and the state it reads.

`Objective` owns the per-rank FNE state (the negative buffer, similarity statistics, the sampling rule) and hands
online features `ia, ta` (with gradient) and keys `ik, tk` to the objective class that `fne.objective` names
(fne_dist.objectives: fne, vsepp, clip, posterior_infonce).  The keys are the momentum towers' (`fne.keys=momentum`,
the caller computes them) or the online features detached (`fne.keys=online`, formed here): constants either way,
so every objective and the buffer treat them alike.  It knows nothing about DeepSpeed, data or towers, so the
trainer, `fne-bench step` and the study share it.  `loss` changes no state: it returns this step's keys and
statistics, and the caller `commit`s them (enqueue, new statistics) only once the step is known to be finite, after
the optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.buffer import NegativeBuffer
from fne_dist.config import FNESection, queue_dtype
from fne_dist.distributed import rank as this_rank
from fne_dist.distributed import world_size
from fne_dist.objectives import objective_class
from fne_dist.objectives.base import StepFeatures
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats


@dataclass
class StepLoss:
    loss: torch.Tensor  # 0-dim, with gradient into ia and ta (and the logit scale for objectives that are `scaled`)
    keys: GlobalKeys  # this step's global keys (momentum, or online detached), to enqueue after the step
    stats: SimilarityStats  # the statistics with this step's moments (sampled with), to keep after the step
    diagnostics: torch.Tensor  # [len(DIAGNOSTICS)] float64 sums over this rank's anchors (both directions)
    index: torch.Tensor | None = None  # [2, b] the drawn global columns per direction (NO_NEGATIVE where none)


class Objective:
    """The FNE state of one rank (its part of the negative buffer, rank-merged statistics) and the per-step loss."""

    def __init__(self, cfg: FNESection, dim: int, device: torch.device, seed: int):
        self.cfg = cfg
        self.rule = cfg.rule()
        self.seed = seed
        self.buffer = NegativeBuffer(cfg.queue_size, dim, queue_dtype(cfg, device), device, layout=cfg.buffer,
                                     rank=this_rank(), world=world_size())
        self.stats = SimilarityStats(reset=cfg.stats_reset, ema_decay=cfg.ema_decay, device=device)
        state = (cfg, self.rule, self.buffer, seed)
        cls = objective_class(cfg.objective)
        self.step_objective = cls(*state)
        self.warmup_objective = cls.warmup(*state) if cls.warmup else None

    @property
    def scaled(self) -> bool:
        """The objective uses the model's logit scale (a temperature); the others keep it frozen."""
        return self.step_objective.scaled

    def loss(self, ia, ta, ik, tk, ids, labels, *, step: int, rank: int, warmup: bool,
             logit_scale: torch.Tensor | None = None) -> StepLoss:
        """This rank's loss over its b anchors.  ik, tk: the momentum keys with fne.keys=momentum, None with
        fne.keys=online (the keys are then ia, ta detached).  warmup: an objective with a warm-up (fne: VSE++
        in-batch, FNE_SPEC step 9) runs that instead, with the statistics unchanged; logit_scale: exp of the model's
        logit scale (with gradient), required by `scaled` objectives."""
        if self.scaled and logit_scale is None:
            raise ValueError(f"objective {self.cfg.objective!r} needs the model's logit_scale (exp'd): pass "
                             "logit_scale=")
        online = self.cfg.keys == "online"
        if (ik is None or tk is None) != online:
            raise ValueError(f"fne.keys={self.cfg.keys!r}: pass ik=tk=None with online keys (they are the online "
                             "features, detached) and the momentum towers' keys otherwise")
        if online:
            ik, tk = ia.detach(), ta.detach()
        keys = GlobalKeys.gather(ik, tk, ids, labels)
        warming = warmup and self.warmup_objective is not None
        stats = self.stats if warming else self.stats.updated(ia, ta, ids)
        features = StepFeatures(ia, ta, ik, tk, ids, labels, keys, stats, step, rank, logit_scale)
        out = (self.warmup_objective if warming else self.step_objective)(features)
        return StepLoss(out.loss, keys, stats, out.diagnostics, out.index)

    def commit(self, out: StepLoss) -> None:
        """Keep a finished step's statistics and enqueue its keys (FNE_SPEC step 10)."""
        self.stats = out.stats
        self.buffer.enqueue(out.keys)
