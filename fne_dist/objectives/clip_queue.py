"""CLIP + memory: open_clip's ClipLoss unchanged, plus an InfoNCE of each anchor against the queue's keys whose
negatives the posterior weighs by 1 - f (issue 24: the buffer is where false negatives are many)."""
from __future__ import annotations

from fne_dist.objectives.base import ObjectiveOutput, StepFeatures
from fne_dist.objectives.clip import Clip
from fne_dist.objectives.posterior_infonce import buffer_infonce


class ClipQueue(Clip):
    """ClipLoss (the `clip` objective) + fne.queue_weight x the posterior-weighted InfoNCE (fne_dist.infonce) of
    this rank's online anchors against the queue's valid keys (momentum keys of earlier batches; the batch itself
    is ClipLoss's), each positive the anchor's pair's momentum key.  The memory term is on from epoch
    fne.queue_start_epoch (before it: plain CLIP, while the queue fills and the statistics settle).  With the
    posterior off (a huge fne.prior_ratio) it is XBM-style CLIP + memory.  Either buffer layout (sharded: the
    partial log-sum-exps exchanged, as for posterior_infonce)."""

    reads_keys = reads_buffer = True

    @classmethod
    def uses_posterior(cls, cfg) -> bool:
        return True

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        if x.epoch is None:
            raise ValueError("fne.objective=clip_queue switches its memory term on at fne.queue_start_epoch: pass "
                             "the training epoch to Objective.loss (epoch=)")
        out = super().__call__(x)
        if x.epoch < self.cfg.queue_start_epoch or self.cfg.queue_weight == 0:
            return out
        memory, diagnostics = buffer_infonce(self, x, queue_only=True)
        return ObjectiveOutput(out.loss + self.cfg.queue_weight * memory, out.diagnostics + diagnostics)
