"""CLIP's objective: open_clip's ClipLoss (in-batch InfoNCE over the global batch, learnable temperature)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from fne_dist.distributed import rank, world_size
from fne_dist.losses import false_negative_mask
from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import softmax_diagnostics


def others_of_key(keys: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: another pair of the same identity key (under fne.oracle, a true false negative)."""
    return (keys[:, None] == keys[None, :]) & ~torch.eye(len(keys), dtype=torch.bool, device=keys.device)


class Clip(StepObjective):
    """open_clip's ClipLoss; with fne.oracle the same logits with the other pairs of an anchor's key out of the
    softmax (ClipLoss itself when no two pairs share one); diagnostics on this rank's in-batch softmax."""

    scaled = True

    def __init__(self, *args):
        super().__init__(*args)
        self.clip_loss = ClipLoss(rank=rank(), world_size=world_size())

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        if not self.cfg.oracle:
            loss = self.clip_loss(x.ia.float(), x.ta.float(), x.logit_scale)
        else:
            per_image, per_text = self.logits(x)
            target = self.clip_loss.get_ground_truth(per_image.device, per_image.shape[0])
            loss = (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2
        return ObjectiveOutput(loss, in_batch_diagnostics(x, self.cfg.oracle))

    def logits(self, x: StepFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """ClipLoss's logits over the global batch (per image, per text); with fne.oracle the other pairs of a key
        masked to -inf (x.keys.ids is the global batch's keys in the logits' order)."""
        per_image, per_text = self.clip_loss.get_logits(x.ia.float(), x.ta.float(), x.logit_scale)
        if self.cfg.oracle:
            drop = others_of_key(x.keys.ids)
            per_image, per_text = (lg.masked_fill(drop, float("-inf")) for lg in (per_image, per_text))
        return per_image, per_text


def in_batch_diagnostics(x: StepFeatures, oracle: bool = False) -> torch.Tensor:
    """DIAGNOSTICS sums of this rank's in-batch softmax, both directions (what the in-batch InfoNCE objectives
    report): each row's negative mass and the part of it on labelled false negatives (none left under the oracle,
    whose softmax leaves them out)."""
    with torch.no_grad():
        logits = x.logit_scale.float() * x.ia.float() @ x.ta.float().T
        ids, labels = x.ids, x.labels
        if oracle:
            logits = logits.masked_fill(others_of_key(ids), float("-inf"))
        false_neg = false_negative_mask(ids[:, None], labels[:, None], ids[None, :], labels[None, :])
        return sum(softmax_diagnostics(-lg.log_softmax(1).diagonal(), (lg.softmax(1) * false_neg).sum(1))
                   for lg in (logits, logits.T))
