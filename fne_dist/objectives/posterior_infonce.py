"""FNE's posterior inside InfoNCE: each anchor against [global batch ; queue], every negative's exp-logit weighted
by 1 - f (FNE_SPEC "Beyond the released rule"; the streamed loss is fne_dist.infonce)."""
from __future__ import annotations

import torch

from fne_dist.infonce import CandidateSet, posterior_infonce
from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import DIAGNOSTICS, join_segments, softmax_diagnostics


class PosteriorInfoNCE(StepObjective):
    """InfoNCE over [global batch ; queue] with (1 - f)-weighted negatives, mean of the two directions.  It reads
    every candidate of every anchor: the replicated buffer only, whose segments are joined into one candidate set (a
    copy per step: a fused kernel that reads the segments in place is the next step)."""

    scaled = True

    def __init__(self, *args):
        super().__init__(*args)
        if self.buffer.sharded:
            raise ValueError("fne.objective=posterior_infonce reads every candidate for every anchor: set "
                             "fne.buffer=replicated (the sharded buffer serves the sampling objectives)")

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        ia, ta = x.ia.float(), x.ta.float()
        text, image, cand_ids, cand_labels, valid = join_segments(self.buffer.segments(x.keys),
                                                                  ("text", "image", "ids", "labels", "valid"))
        loss = ia.new_zeros(())
        diagnostics = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=ia.device)
        for anchors, pos_keys, pool in ((ia, x.tk, text), (ta, x.ik, image)):
            rows, false_prob = posterior_infonce(
                anchors, x.logit_scale, pos_keys, CandidateSet(pool, cand_ids, cand_labels, valid, x.ids, x.labels),
                x.stats, self.rule, impl=self.cfg.impl)
            loss = loss + rows.mean() / 2
            diagnostics += softmax_diagnostics(rows.detach(), false_prob)
        return ObjectiveOutput(loss, diagnostics)
