"""FNE's posterior inside InfoNCE: each anchor against [global batch ; queue], every negative's exp-logit weighted
by 1 - f (FNE_SPEC "Beyond the released rule"; the streamed loss is fne_dist.infonce)."""
from __future__ import annotations

import torch

from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import DIAGNOSTICS, softmax_diagnostics


class PosteriorInfoNCE(StepObjective):
    """InfoNCE over [global batch ; queue] with (1 - f)-weighted negatives, mean of the two directions, in either
    buffer layout (`NegativeBuffer.infonce`: the segments read in place; sharded, the partials exchanged)."""

    scaled = True
    reads_keys = reads_buffer = True

    @classmethod
    def uses_posterior(cls, cfg) -> bool:
        return True

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        return ObjectiveOutput(*buffer_infonce(self, x))


def buffer_infonce(objective: StepObjective, x: StepFeatures, queue_only: bool = False):
    """(loss, DIAGNOSTICS sums): the posterior-weighted InfoNCE of this rank's anchors against the objective's
    buffer ([global batch ; queue], or the queue alone), image anchors against the texts and text anchors against
    the images, each positive the anchor's pair's momentum key; mean over rows, then over the two directions."""
    loss = x.ia.new_zeros((), dtype=torch.float32)
    diagnostics = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=x.ia.device)
    # direction 0: image anchors against text candidates; 1: text anchors against image candidates
    for direction, (anchors, pos_keys) in enumerate(((x.ia, x.tk), (x.ta, x.ik))):
        rows, false_prob = objective.buffer.infonce(anchors.float(), x.logit_scale, pos_keys, x.ids, x.labels, x.keys,
                                                    x.stats, objective.rule, direction=direction,
                                                    queue_only=queue_only, impl=objective.cfg.impl)
        loss = loss + rows.mean() / 2
        diagnostics += softmax_diagnostics(rows.detach(), false_prob)
    return loss, diagnostics
