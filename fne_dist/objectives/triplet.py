"""The triplet objectives: FNE's sampled negative (FNE_SPEC steps 7-9) and VSE++'s hardest in-batch negative."""
from __future__ import annotations

import torch

from fne_dist.buffer import Segment, false_candidate_counts, has_false_candidate
from fne_dist.losses import triplet_hinges, vsepp_hardest
from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import pick_diagnostics
from fne_dist.weights import true_negative_prob


class VSEpp(StepObjective):
    """VSE++: each anchor's hardest in-batch negative, both directions (FNE's warm-up, and a baseline)."""

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        ia, ta, ids, labels = x.ia.float(), x.ta.float(), x.ids, x.labels
        (cost_i2t, col_i2t), (cost_t2i, row_t2i) = vsepp_hardest(ia, ta, ids, self.rule.margin)
        # a zero-cost row's argmax is arbitrary; what VSE++ pushes there is nothing, so only costed rows count as picks
        in_batch = [Segment(0, ia, ta, ids, labels, None)]  # this rank's batch: VSE++'s candidates
        at_risk = has_false_candidate(labels, false_candidate_counts(ids, labels, in_batch))
        diagnostics = sum(pick_diagnostics(ids, labels, ids[j], labels[j], cost > 0, at_risk, cost.detach())
                          for cost, j in ((cost_i2t, col_i2t), (cost_t2i, row_t2i)))
        return ObjectiveOutput((cost_i2t + cost_t2i).mean(), diagnostics)


class FNETriplet(StepObjective):
    """One negative per anchor and direction, drawn from [global batch ; queue] by fne.mode (official, bayes,
    hardness, eliminate); triplet hinge, weighted by the drawn candidate's 1 - f with fne.posterior_hinge."""

    warmup = VSEpp
    reads_keys = reads_buffer = True

    @classmethod
    def uses_posterior(cls, cfg) -> bool:
        return cfg.mode in ("bayes", "eliminate", "official") or cfg.posterior_hinge

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        at_risk = self.buffer.at_risk(x.ids, x.labels, x.keys, row_offset=x.rank * len(x.ids))
        # direction 0: image anchors against text candidates; 1: text anchors against image candidates; both drawn
        # in one call, each tensor below [2, b, ...]
        features = torch.stack((x.ia, x.ta))
        anchors = features.float()  # the loss in fp32; the sampler reads the features in the compute dtype
        pos_keys = torch.stack((x.tk, x.ik)).float()  # row rank*b + i of the gathered keys is this rank's row i
        pos_sims = (anchors.detach() * pos_keys).sum(-1)
        neg = self.buffer.draw(features.detach(), pos_sims, x.ids, x.keys, x.stats, self.rule,
                               row_offset=x.rank * len(x.ids), seed=self.seed, step=x.step, impl=self.cfg.impl)
        has = neg.sample.has_negative
        neg_keys = neg.keys.float()
        weight = has.float()
        if self.cfg.posterior_hinge:
            weight = weight * true_negative_prob((anchors.detach() * neg_keys).sum(-1), x.stats, self.rule)
        hinges = triplet_hinges(anchors, pos_keys, neg_keys, self.rule.margin) * weight
        diagnostics = pick_diagnostics(x.ids, x.labels, neg.ids, neg.labels, has, at_risk, hinges.detach(),
                                       sampled=neg.sample)
        return ObjectiveOutput(hinges.mean(-1).sum(), diagnostics, neg.sample.index)
