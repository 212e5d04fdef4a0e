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
        ia, ta, ids, labels = x.ia.float(), x.ta.float(), x.ids, x.labels
        loss = self._oracle_loss(ia, ta, x) if self.cfg.oracle else self.clip_loss(ia, ta, x.logit_scale)
        with torch.no_grad():
            logits = x.logit_scale.float() * ia @ ta.T
            if self.cfg.oracle:
                logits = logits.masked_fill(others_of_key(ids), float("-inf"))
            false_neg = false_negative_mask(ids[:, None], labels[:, None], ids[None, :], labels[None, :])
            diagnostics = sum(softmax_diagnostics(-lg.log_softmax(1).diagonal(), (lg.softmax(1) * false_neg).sum(1))
                              for lg in (logits, logits.T))
        return ObjectiveOutput(loss, diagnostics)

    def _oracle_loss(self, ia, ta, x: StepFeatures) -> torch.Tensor:
        """ClipLoss's logits and targets over the global batch, the other pairs of a key masked (x.keys.ids is
        the global batch's keys in the logits' order)."""
        per_image, per_text = self.clip_loss.get_logits(ia, ta, x.logit_scale)
        drop = others_of_key(x.keys.ids)
        target = self.clip_loss.get_ground_truth(ia.device, per_image.shape[0])
        return (F.cross_entropy(per_image.masked_fill(drop, float("-inf")), target)
                + F.cross_entropy(per_text.masked_fill(drop, float("-inf")), target)) / 2
