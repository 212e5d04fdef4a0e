"""The loss of one training step from the step's features (FNE_SPEC steps 3-9), and the state it reads.

`Objective` owns the per-rank FNE state (the negative buffer, similarity statistics, the sampling rule) and turns
online features `ia, ta` (with gradient) and momentum keys `ik, tk` into the loss.  It knows nothing about
DeepSpeed, data or towers.  `loss` changes no state: it returns this step's keys and statistics, and the caller
`commit`s them (enqueue, new statistics) only once the step is known to be finite, after the optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.buffer import NegativeBuffer
from fne_dist.config import FNESection, queue_dtype
from fne_dist.distributed import rank as this_rank
from fne_dist.distributed import world_size
from fne_dist.losses import fne_triplet_loss, hardest_in_batch, vsepp_loss
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats

DIAGNOSTICS = ("sampled_rows", "fallback", "survivors", "no_negative", "labelled", "false_negatives")


@dataclass
class StepLoss:
    loss: torch.Tensor  # 0-dim, with gradient into ia and ta
    keys: GlobalKeys  # this step's global momentum keys, to enqueue after the optimizer step
    stats: SimilarityStats  # the statistics with this step's moments (sampled with), to keep after the step
    diagnostics: torch.Tensor  # [len(DIAGNOSTICS)] float64 sums over this rank's sampled negatives (both directions)
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

    def loss(self, ia, ta, ik, tk, ids, labels, *, step: int, rank: int, warmup: bool) -> StepLoss:
        """The FNE loss (or, in warm-up, VSE++ hardest negatives in-batch) of this rank's b anchors."""
        keys = GlobalKeys.gather(ik, tk, ids, labels)
        if warmup:
            loss = vsepp_loss(ia.float(), ta.float(), ids, self.rule.margin)
            return StepLoss(loss, keys, self.stats, self._hardest_diagnostics(ia.float(), ta.float(), ids, labels))
        stats = self.stats.updated(ia, ta, ids)
        loss = ia.new_zeros((), dtype=torch.float32)
        diagnostics = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=ia.device)
        index = []
        # direction 0: image anchors against text candidates; 1: text anchors against image candidates
        for direction, (features, pos_keys) in enumerate(((ia, tk), (ta, ik))):
            anchors = features.float()  # the loss in fp32; the sampler reads the features in the compute dtype
            pos_keys = pos_keys.float()  # row rank*b + i of the gathered keys is this rank's row i
            pos_sims = (anchors.detach() * pos_keys).sum(1)
            neg = self.buffer.draw(features.detach(), pos_sims, ids, keys, stats, self.rule,
                                   row_offset=rank * len(ids), seed=self.seed, step=step, direction=direction,
                                   impl=self.cfg.impl)
            has = neg.sample.has_negative
            loss = loss + fne_triplet_loss(anchors, pos_keys, neg.keys.float(), self.rule.margin,
                                           weight=has.to(anchors.dtype))
            diagnostics += _negative_diagnostics(ids, labels, neg.ids, neg.labels, has, sampled=neg.sample)
            index.append(neg.sample.index)
        return StepLoss(loss, keys, stats, diagnostics, torch.stack(index))

    def commit(self, out: StepLoss) -> None:
        """Keep a finished step's statistics and enqueue its keys (FNE_SPEC step 10)."""
        self.stats = out.stats
        self.buffer.enqueue(out.keys)

    @staticmethod
    @torch.no_grad()
    def _hardest_diagnostics(ia, ta, ids, labels) -> torch.Tensor:
        """What VSE++ picks, both directions: each anchor's most similar in-batch item of another id."""
        has = torch.ones_like(ids, dtype=torch.bool)
        return sum(_negative_diagnostics(ids, labels, ids[hardest.indices], labels[hardest.indices], has)
                   for hardest in hardest_in_batch(ia @ ta.T, ids))


def _negative_diagnostics(ids, labels, neg_ids, neg_labels, has, sampled=None) -> torch.Tensor:
    """Sums for the log (DIAGNOSTICS): rows drawn by the FNE sampler with how many fell back, how many candidates
    survived and how many got no negative (`sampled`: the SampleResult), labelled negatives, and false negatives:
    chosen negatives of the anchor's class label but another image id, over the rows that got a negative (`has`;
    masks, not boolean indexing, so that nothing waits for the device)."""
    labelled = has & (labels >= 0) & (neg_labels >= 0)
    false_neg = labelled & (labels == neg_labels) & (ids != neg_ids)
    out = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=ids.device)
    if sampled is not None:
        out[0], out[1], out[2] = len(sampled.index), sampled.fallback.sum(), sampled.survivors.sum()
        out[3] = (~sampled.has_negative).sum()
    out[4], out[5] = labelled.sum(), false_neg.sum()
    return out


def summarise(sums: dict[str, float]) -> dict[str, float]:
    """Shares and means from DIAGNOSTICS sums (summed over steps and ranks), where they are defined."""
    out = {}
    if sums["sampled_rows"]:
        out["fallback_share"] = sums["fallback"] / sums["sampled_rows"]
        out["mean_survivors"] = sums["survivors"] / sums["sampled_rows"]
        out["no_negative_share"] = sums["no_negative"] / sums["sampled_rows"]
    if sums["labelled"]:
        out["false_negative_share"] = sums["false_negatives"] / sums["labelled"]
    return out
