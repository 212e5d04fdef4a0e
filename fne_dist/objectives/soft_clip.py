"""Posterior soft targets: CLIP's in-batch InfoNCE whose target spreads part of each row onto the pairs that FNE's
posterior calls positive (ALBEF's momentum distillation, FNC, SoftCLIP, with FNE's posterior as the teacher)."""
from __future__ import annotations

import torch

from fne_dist.objectives.base import ObjectiveOutput, StepFeatures
from fne_dist.objectives.clip import Clip, in_batch_diagnostics, others_of_key
from fne_dist.weights import true_negative_prob


class SoftClip(Clip):
    """ClipLoss's logits (the global batch when distributed), cross-entropy against soft targets, both directions:
    row i's target is (1 - fne.soft_alpha) x pair i's one-hot + fne.soft_alpha x the row's posterior P(positive | s)
    normalised, on the detached similarities of the global batch's momentum keys (each pair's own column
    included).  A row whose posterior is all zero (before the statistics are ready) keeps the one-hot; with
    soft_alpha 0 it is ClipLoss.  fne.soft_teacher=uniform spreads the share evenly instead (label smoothing over
    the global batch): the control that separates what FNE's posterior adds from what any softer target does.  It
    reads the global batch's keys, not the buffer."""

    reads_keys = True

    @classmethod
    def uses_posterior(cls, cfg) -> bool:
        return cfg.soft_teacher != "uniform"

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        per_image, per_text = self.logits(x)
        with torch.no_grad():
            if self.cfg.soft_teacher == "uniform":  # label smoothing: the control that tells what the posterior adds
                positive = torch.ones(len(x.keys.image), len(x.keys.text), device=x.keys.image.device)
            else:
                positive = 1 - true_negative_prob(x.keys.image.float() @ x.keys.text.float().T, x.stats, self.rule)
            if self.cfg.oracle:  # the masked pairs are out of the softmax: no target mass on them
                positive = positive.masked_fill(others_of_key(x.keys.ids), 0)
        alpha = self.cfg.soft_alpha
        loss = (soft_cross_entropy(per_image, soft_targets(positive, alpha)) +
                soft_cross_entropy(per_text, soft_targets(positive.T, alpha))) / 2
        return ObjectiveOutput(loss, in_batch_diagnostics(x, self.cfg.oracle))


def soft_targets(positive: torch.Tensor, alpha: float) -> torch.Tensor:
    """[G, G] rows (1 - alpha) e_i + alpha p_i / sum_j p_ij from the posterior p [G, G]; e_i where sum_j p_ij = 0."""
    eye = torch.eye(len(positive), dtype=positive.dtype, device=positive.device)
    total = positive.sum(1, keepdim=True)
    soft = (1 - alpha) * eye + alpha * positive / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, soft, eye)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_ij log softmax_ij, terms with t_ij = 0 left out (so a -inf logit of the oracle's
    mask, which has no target mass, adds 0, not nan); F.cross_entropy with probabilities where no logit is -inf."""
    return -torch.where(targets > 0, targets * logits.log_softmax(1), 0).sum(1).mean()
