"""FNE's posterior inside InfoNCE: each anchor against [global batch ; queue], every negative's exp-logit weighted
by 1 - f (FNE_SPEC "Beyond the released rule"; the streamed loss is fne_dist.infonce)."""
from __future__ import annotations

import torch

from fne_dist.infonce import CandidateSet, posterior_infonce
from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import DIAGNOSTICS, join_segments, softmax_diagnostics
from fne_dist.weights import FNEConfig


class PosteriorInfoNCE(StepObjective):
    """InfoNCE over [global batch ; queue] with (1 - f)-weighted negatives, mean of the two directions.  It reads
    every candidate of every anchor: the replicated buffer only, whose segments are joined into one candidate set (a
    copy per step: a fused kernel that reads the segments in place is the next step)."""

    scaled = True
    replicated_only = True

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        candidates = join_segments(self.buffer.segments(x.keys), ("image", "text", "ids", "labels", "valid"))
        return ObjectiveOutput(*candidate_infonce(x, *candidates, self.rule))


def candidate_infonce(x: StepFeatures, image, text, ids, labels, valid, rule: FNEConfig):
    """(loss, DIAGNOSTICS sums): the posterior-weighted InfoNCE of this rank's anchors against candidate keys
    (image, text [N, D] with ids, labels, valid [N]), image anchors against the texts and text anchors against the
    images, each positive the anchor's pair's momentum key; mean over rows, then over the two directions."""
    loss = x.ia.new_zeros((), dtype=torch.float32)
    diagnostics = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=x.ia.device)
    for anchors, pos_keys, pool in ((x.ia.float(), x.tk, text), (x.ta.float(), x.ik, image)):
        rows, false_prob = posterior_infonce(anchors, x.logit_scale, pos_keys,
                                             CandidateSet(pool, ids, labels, valid, x.ids, x.labels), x.stats, rule)
        loss = loss + rows.mean() / 2
        diagnostics += softmax_diagnostics(rows.detach(), false_prob)
    return loss, diagnostics
