"""The loss of one training step from the step's features (FNE_SPEC steps 3-9), and the state it reads.

`Objective` owns the per-rank FNE state (the negative buffer, similarity statistics, the sampling rule) and turns
online features `ia, ta` (with gradient) and momentum keys `ik, tk` into the loss.  It knows nothing about
DeepSpeed, data or towers, so the trainer, `fne-bench step` and the study share it.  `loss` changes no state: it
returns this step's keys and statistics, and the caller `commit`s them (enqueue, new statistics) only once the step
is known to be finite, after the optimizer step.

Objectives (`FNESection.objective`), all sharing the statistics, the buffer and the diagnostics:
- "fne": one sampled negative per anchor from [global batch ; queue] by `FNESection.mode` (official, bayes,
  hardness, eliminate), triplet hinge, optionally weighted by the drawn candidate's 1 - f (`posterior_hinge`);
  VSE++ in-batch during the warm-up epochs;
- "vsepp": VSE++'s hardest in-batch negative throughout;
- "clip": open_clip's ClipLoss (in-batch InfoNCE, learnable temperature);
- "posterior_infonce": InfoNCE over [global batch ; queue] with each negative's exp-logit weighted by 1 - f
  (replicated buffer only: it reads every candidate of every anchor; `config.check_world` refuses a sharded one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.loss import ClipLoss

from fne_dist.buffer import NegativeBuffer
from fne_dist.config import FNESection, queue_dtype
from fne_dist.distributed import rank as this_rank
from fne_dist.distributed import world_size
from fne_dist.infonce import CandidateSet, posterior_infonce
from fne_dist.losses import false_negative_mask, triplet_hinges, vsepp_hardest
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats
from fne_dist.weights import true_negative_prob

DIAGNOSTICS = ("sampled_rows", "fallback", "survivors", "no_negative", "labelled", "false_negatives",
               "at_risk", "loss_mass", "loss_false_negatives")
SCALED_OBJECTIVES = ("clip", "posterior_infonce")  # the objectives with a temperature (the model's logit scale)


@dataclass
class StepLoss:
    loss: torch.Tensor  # 0-dim, with gradient into ia and ta (and the logit scale for SCALED_OBJECTIVES)
    keys: GlobalKeys  # this step's global momentum keys, to enqueue after the optimizer step
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
        self.clip_loss = ClipLoss(rank=this_rank(), world_size=world_size())

    def loss(self, ia, ta, ik, tk, ids, labels, *, step: int, rank: int, warmup: bool,
             logit_scale: torch.Tensor | None = None) -> StepLoss:
        """This rank's loss over its b anchors.  warmup: the "fne" objective uses VSE++ in-batch (FNE_SPEC step 9);
        logit_scale: exp of the model's logit scale (with gradient), required by SCALED_OBJECTIVES."""
        keys = GlobalKeys.gather(ik, tk, ids, labels)
        objective = self.cfg.objective
        if objective in SCALED_OBJECTIVES and logit_scale is None:
            raise ValueError(f"objective {objective!r} needs the model's logit_scale (exp'd): pass logit_scale=")
        if warmup and objective == "fne":
            loss, diagnostics = self._vsepp(ia.float(), ta.float(), ids, labels)
            return StepLoss(loss, keys, self.stats, diagnostics)
        stats = self.stats.updated(ia, ta, ids)
        index = None
        if objective == "vsepp":
            loss, diagnostics = self._vsepp(ia.float(), ta.float(), ids, labels)
        elif objective == "clip":
            loss, diagnostics = self._clip(ia.float(), ta.float(), ids, labels, logit_scale)
        elif objective == "posterior_infonce":
            loss, diagnostics = self._posterior_infonce(ia.float(), ta.float(), ik, tk, ids, labels, keys, stats,
                                                        logit_scale)
        else:
            loss, diagnostics, index = self._fne(ia, ta, ik, tk, ids, labels, keys, stats, step=step, rank=rank)
        return StepLoss(loss, keys, stats, diagnostics, index)

    def commit(self, out: StepLoss) -> None:
        """Keep a finished step's statistics and enqueue its keys (FNE_SPEC step 10)."""
        self.stats = out.stats
        self.buffer.enqueue(out.keys)

    def _fne(self, ia, ta, ik, tk, ids, labels, keys, stats, *, step, rank):
        """One sampled negative per anchor and direction, triplet hinge (weighted by 1 - f with posterior_hinge)."""
        loss = ia.new_zeros((), dtype=torch.float32)
        diagnostics = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=ia.device)
        index = []
        at_risk = self._at_risk(ids, labels, keys)
        # direction 0: image anchors against text candidates; 1: text anchors against image candidates
        for direction, (features, pos_keys) in enumerate(((ia, tk), (ta, ik))):
            anchors = features.float()  # the loss in fp32; the sampler reads the features in the compute dtype
            pos_keys = pos_keys.float()  # row rank*b + i of the gathered keys is this rank's row i
            pos_sims = (anchors.detach() * pos_keys).sum(1)
            neg = self.buffer.draw(features.detach(), pos_sims, ids, keys, stats, self.rule,
                                   row_offset=rank * len(ids), seed=self.seed, step=step, direction=direction,
                                   impl=self.cfg.impl)
            has = neg.sample.has_negative
            neg_keys = neg.keys.float()
            weight = has.float()
            if self.cfg.posterior_hinge:
                weight = weight * true_negative_prob((anchors.detach() * neg_keys).sum(1), stats, self.rule)
            hinges = triplet_hinges(anchors, pos_keys, neg_keys, self.rule.margin) * weight
            loss = loss + hinges.mean()
            diagnostics += _pick_diagnostics(ids, labels, neg.ids, neg.labels, has, at_risk, hinges.detach(),
                                             sampled=neg.sample)
            index.append(neg.sample.index)
        return loss, diagnostics, torch.stack(index)

    def _at_risk(self, ids, labels, keys) -> torch.Tensor:
        """[b] bool: the anchor has a false negative among its candidates.  Measured with the replicated buffer
        (every candidate is here); with the sharded one a rank holds a shard only, and no anchor is counted."""
        if self.buffer.sharded:
            return torch.zeros_like(ids, dtype=torch.bool)
        joined = _join(self.buffer.segments(keys), ("ids", "labels", "valid"))
        return _has_false_candidate(ids, labels, *joined)

    def _vsepp(self, ia, ta, ids, labels):
        """VSE++ (the warm-up and a baseline): each anchor's hardest in-batch negative, both directions."""
        (cost_i2t, col_i2t), (cost_t2i, row_t2i) = vsepp_hardest(ia, ta, ids, self.rule.margin)
        # a zero-cost row's argmax is arbitrary; what VSE++ pushes there is nothing, so only costed rows count as picks
        at_risk = _has_false_candidate(ids, labels, ids, labels, torch.ones_like(ids, dtype=torch.bool))
        diagnostics = sum(_pick_diagnostics(ids, labels, ids[j], labels[j], cost > 0, at_risk, cost.detach())
                          for cost, j in ((cost_i2t, col_i2t), (cost_t2i, row_t2i)))
        return (cost_i2t + cost_t2i).mean(), diagnostics

    def _clip(self, ia, ta, ids, labels, logit_scale):
        """open_clip's ClipLoss (global batch when distributed); diagnostics on this rank's in-batch softmax."""
        loss = self.clip_loss(ia, ta, logit_scale)
        with torch.no_grad():
            logits = logit_scale.float() * ia @ ta.T
            false_neg = false_negative_mask(ids[:, None], labels[:, None], ids[None, :], labels[None, :])
            diagnostics = sum(_softmax_diagnostics(-lg.log_softmax(1).diagonal(), (lg.softmax(1) * false_neg).sum(1))
                              for lg in (logits, logits.T))
        return loss, diagnostics

    def _posterior_infonce(self, ia, ta, ik, tk, ids, labels, keys, stats, logit_scale):
        """InfoNCE over [global batch ; queue] with (1 - f)-weighted negatives, mean of the two directions.  The
        replicated buffer's segments are joined into one candidate set (a copy per step: a fused kernel that reads
        the segments in place is the next step)."""
        text, image, cand_ids, cand_labels, valid = _join(self.buffer.segments(keys),
                                                          ("text", "image", "ids", "labels", "valid"))
        loss = ia.new_zeros(())
        diagnostics = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=ia.device)
        for anchors, pos_keys, pool in ((ia, tk, text), (ta, ik, image)):
            rows, false_prob = posterior_infonce(
                anchors, logit_scale, pos_keys, CandidateSet(pool, cand_ids, cand_labels, valid, ids, labels),
                stats, self.rule)
            loss = loss + rows.mean() / 2
            diagnostics += _softmax_diagnostics(rows.detach(), false_prob)
        return loss, diagnostics


def _join(segments, fields) -> list[torch.Tensor]:
    """The named fields of the buffer's segments, joined in global column order (valid None: all valid)."""
    def field(segment, name):
        value = getattr(segment, name)
        return torch.ones_like(segment.ids, dtype=torch.bool) if value is None else value

    return [torch.cat([field(s, name) for s in segments]) for name in fields]


def _has_false_candidate(ids, labels, cand_ids, cand_labels, valid) -> torch.Tensor:
    """[b] bool: the anchor's label is known and some valid candidate has it under another image id.  Counted
    without [b, N]: known candidates of the anchor's label minus those of its id (an image id has one label); by
    sorting all candidates and counting the known ones with a running sum, so no boolean indexing (a host sync)."""
    known = (valid & (cand_labels >= 0)).long()

    def count_known(values, queries):
        order = values.argsort()
        sorted_values = values[order]
        seen = torch.cat([known.new_zeros(1), known[order].cumsum(0)])
        return seen[torch.searchsorted(sorted_values, queries, right=True)] - seen[torch.searchsorted(sorted_values, queries)]

    return (labels >= 0) & (count_known(cand_labels, labels) > count_known(cand_ids, ids))


def _pick_diagnostics(ids, labels, neg_ids, neg_labels, has_neg, at_risk, hinges, sampled=None) -> torch.Tensor:
    """DIAGNOSTICS sums of one direction's picked negatives: rows drawn by the FNE sampler (`sampled`: the
    SampleResult) with their fallbacks, survivors and rows without a negative; labelled picks, false negatives
    among them and the picks of anchors at risk (with a false negative among their candidates: only those can pick
    one), over the rows that got a negative (`has_neg`); the rows' (weighted) hinges, all and those of false
    negatives."""
    labelled = has_neg & (labels >= 0) & (neg_labels >= 0)
    false_neg = has_neg & false_negative_mask(ids, labels, neg_ids, neg_labels)
    picks = None
    if sampled is not None:
        rows = torch.full((), float(len(sampled.index)), dtype=torch.float64, device=hinges.device)
        picks = (rows, sampled.fallback.sum(), sampled.survivors.sum(), (~sampled.has_negative).sum())
    return _diagnostics(picks, (labelled.sum(), false_neg.sum(), (labelled & at_risk).sum()),
                        (hinges.sum(), torch.where(false_neg, hinges, 0.0).sum()))


def _softmax_diagnostics(row_losses, false_prob) -> torch.Tensor:
    """DIAGNOSTICS sums of a softmax loss: each row's negative mass 1 - P(positive) = 1 - exp(-loss) and the part
    of it on false negatives (no picks)."""
    return _diagnostics(None, None, ((1 - (-row_losses).exp()).sum(), false_prob.sum()))


def _diagnostics(picks, labels, loss) -> torch.Tensor:
    """The [len(DIAGNOSTICS)] float64 vector from its three groups of 0-dim sums (None: zeros), stacked on the
    device: setting elements from device tensors one by one would wait for the GPU."""
    zero = torch.zeros((), dtype=torch.float64, device=loss[0].device)
    groups = (picks or (zero,) * 4, labels or (zero,) * 3, loss)
    return torch.stack([t.double() for group in groups for t in group])


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """Shares and means from DIAGNOSTICS sums (summed over steps and ranks), where they are defined.

    false_negative_share: picked negatives that are false negatives (of those with known labels);
    at_risk_false_negative_share: the same over the anchors that had a false negative among their candidates;
    false_negative_loss_share: the part of what pushes negatives away that pushes false negatives, measured as
    hinge values for the triplet objectives and as softmax mass for the InfoNCE ones.
    """
    out = {}
    if sums["sampled_rows"]:
        out["fallback_share"] = sums["fallback"] / sums["sampled_rows"]
        out["mean_survivors"] = sums["survivors"] / sums["sampled_rows"]
        out["no_negative_share"] = sums["no_negative"] / sums["sampled_rows"]
    if sums["labelled"]:
        out["false_negative_share"] = sums["false_negatives"] / sums["labelled"]
    if sums["at_risk"]:
        out["at_risk_false_negative_share"] = sums["false_negatives"] / sums["at_risk"]
    if sums["loss_mass"]:
        out["false_negative_loss_share"] = sums["loss_false_negatives"] / sums["loss_mass"]
    return out
