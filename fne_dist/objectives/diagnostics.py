"""What every objective reports besides its loss: the DIAGNOSTICS sums (picks, false negatives among them, loss mass
on false negatives) and their shares (`summarise`).  Labels only measure false negatives; no loss reads them
(except through fne.oracle's identity keys, `fne_dist.objective.identity_keys`)."""
from __future__ import annotations

import torch

from fne_dist.losses import false_negative_mask

DIAGNOSTICS = ("sampled_rows", "fallback", "survivors", "no_negative", "labelled", "false_negatives",
               "at_risk", "loss_mass", "loss_false_negatives")


def pick_diagnostics(ids, labels, neg_ids, neg_labels, has_neg, at_risk, hinges, sampled=None) -> torch.Tensor:
    """DIAGNOSTICS sums of the picked negatives (one direction's [b], or [K, b] of K): rows drawn by the FNE sampler
    (`sampled`: the SampleResult) with their fallbacks, survivors and rows without a negative; labelled picks,
    false negatives among them and the picks of anchors at risk (with a false negative among their candidates: only
    those can pick one), over the rows that got a negative (`has_neg`); the rows' (weighted) hinges, all and those
    of false negatives."""
    labelled = has_neg & (labels >= 0) & (neg_labels >= 0)
    false_neg = has_neg & false_negative_mask(ids, labels, neg_ids, neg_labels)
    picks = None
    if sampled is not None:
        rows = torch.full((), float(sampled.index.numel()), dtype=torch.float64, device=hinges.device)
        picks = (rows, sampled.fallback.sum(), sampled.survivors.sum(), (~sampled.has_negative).sum())
    return _diagnostics(picks, (labelled.sum(), false_neg.sum(), (labelled & at_risk).sum()),
                        (hinges.sum(), torch.where(false_neg, hinges, 0.0).sum()))


def softmax_diagnostics(row_losses, false_prob) -> torch.Tensor:
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


def calibration_table(f: torch.Tensor, is_false_negative: torch.Tensor, bins: int = 10) -> list[dict]:
    """Is the posterior calibrated?  Per bin of the false-negative probability f (`bins` equal bins of [0, 1], the
    last one closed), the candidates in it: {"lo", "hi", "count", "mean_f", "false_negatives", "share"}, where
    share is the fraction that are true false negatives (NaN for an empty bin).  A calibrated posterior has share
    close to mean_f in every bin.  f and is_false_negative: the same shape (e.g. [anchors, candidates])."""
    if f.shape != is_false_negative.shape:
        raise ValueError(f"calibration_table: f {tuple(f.shape)} and is_false_negative "
                         f"{tuple(is_false_negative.shape)} must have the same shape")
    f = f.detach().double().flatten()
    hits = is_false_negative.flatten().double()
    index = (f * bins).long().clamp(0, bins - 1)
    count, f_sum, fn = (torch.zeros(bins, dtype=torch.float64).index_add_(0, index.cpu(), v.cpu())
                        for v in (torch.ones_like(f), f, hits))
    return [{"lo": k / bins, "hi": (k + 1) / bins, "count": int(count[k]),
             "mean_f": float(f_sum[k] / count[k]) if count[k] else float("nan"), "false_negatives": int(fn[k]),
             "share": float(fn[k] / count[k]) if count[k] else float("nan")} for k in range(bins)]
