"""CLIP's objective: open_clip's ClipLoss (in-batch InfoNCE over the global batch, learnable temperature)."""
from __future__ import annotations

import torch
from open_clip.loss import ClipLoss

from fne_dist.distributed import rank, world_size
from fne_dist.losses import false_negative_mask
from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import softmax_diagnostics


class Clip(StepObjective):
    """open_clip's ClipLoss; diagnostics on this rank's in-batch softmax."""

    scaled = True

    def __init__(self, *args):
        super().__init__(*args)
        self.clip_loss = ClipLoss(rank=rank(), world_size=world_size())

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        return ObjectiveOutput(self.clip_loss(x.ia.float(), x.ta.float(), x.logit_scale), in_batch_diagnostics(x))


def in_batch_diagnostics(x: StepFeatures) -> torch.Tensor:
    """DIAGNOSTICS sums of this rank's in-batch softmax, both directions (what the in-batch InfoNCE objectives
    report): each row's negative mass and the part of it on labelled false negatives."""
    with torch.no_grad():
        logits = x.logit_scale.float() * x.ia.float() @ x.ta.float().T
        ids, labels = x.ids, x.labels
        false_neg = false_negative_mask(ids[:, None], labels[:, None], ids[None, :], labels[None, :])
        return sum(softmax_diagnostics(-lg.log_softmax(1).diagonal(), (lg.softmax(1) * false_neg).sum(1))
                   for lg in (logits, logits.T))
