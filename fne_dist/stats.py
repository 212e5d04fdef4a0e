"""Gaussian statistics of positive and negative similarity (FNE_SPEC step 6), exact and rank-merged, and the
prior of a false negative fitted by EM on the same similarities (`prior_fit`)."""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from fne_dist.distributed import all_reduce
from fne_dist.losses import hardest_in_batch, same_id

RESET_POLICIES = ("epoch", "never", "ema")
NEG_FITS = ("hardest", "all")  # the negatives the negative Gaussian is fitted to
MIN_VAR = 1e-8
PRIOR_RANGE = (1e-12, 0.5)  # the fitted prior of a false negative is clamped to it (rho = 1 / prior >= 2)
# (statistics so far, in-batch matrix S [b, b] float64, same-id mask [b, b]) -> [pairs, sum of responsibilities]
PriorEStep = Callable[["SimilarityStats", torch.Tensor, torch.Tensor], torch.Tensor]


class SimilarityStats:
    """Exact moments (count, sum, sum of squares) of positive and negative similarities.

    Moments are float64 tensors on the features' device; `update` never synchronises with the host.
    Reset policy: `epoch` clears them at each `new_epoch()` (the released code), `never` keeps them,
    `ema` multiplies the old moments by `ema_decay` before adding each step's (an exponentially
    weighted window whose effective count is what `ready` compares with min_count).

    neg_fit: the negatives of the negative Gaussian, `hardest` (each counted row's hardest in-batch negative per
    direction, the released rule) or `all` (every in-batch pair of another id).  prior_fit: also fit the prior of a
    false negative (`log_prior_odds`) by online EM on the in-batch pairs of another id, a mixture of the two
    Gaussians whose components stay fixed (the moments) and whose weight is re-estimated: each step adds, under the
    same reset policy, the pairs' count and their responsibilities (the E-step, `fne_dist.weights.prior_e_step`:
    the posterior f with the prior fitted so far, once the statistics are ready); the fitted prior is their ratio.
    """

    def __init__(self, reset: str = "epoch", ema_decay: float = 0.99, device: torch.device | str = "cpu",
                 neg_fit: str = "hardest", prior_fit: bool = False):
        if reset not in RESET_POLICIES:
            raise ValueError(f"SimilarityStats reset={reset!r} is unknown: use one of {RESET_POLICIES}")
        if reset == "ema" and not 0 < ema_decay < 1:
            raise ValueError(f"SimilarityStats ema_decay={ema_decay} must lie in (0, 1)")
        if neg_fit not in NEG_FITS:
            raise ValueError(f"SimilarityStats neg_fit={neg_fit!r} is unknown: use one of {NEG_FITS}")
        self.reset = reset
        self.ema_decay = ema_decay
        self.neg_fit = neg_fit
        self.prior_fit = prior_fit
        # [count_pos, sum_pos, sumsq_pos, count_neg, sum_neg, sumsq_neg]
        self.moments_vec = torch.zeros(6, dtype=torch.float64, device=device)
        # [pairs weighed, sum of their responsibilities]: the online EM's sums (prior_fit)
        self.prior_sums = torch.zeros(2, dtype=torch.float64, device=device)

    @classmethod
    def from_moments(cls, count_pos, mean_pos, var_pos, mean_neg, var_neg, count_neg=None, **kwargs):
        """Statistics with the given counts, means and (population) variances."""
        stats = cls(**kwargs)
        count_neg = 2 * count_pos if count_neg is None else count_neg
        stats.moments_vec = torch.tensor(
            [count_pos, count_pos * mean_pos, count_pos * (var_pos + mean_pos**2),
             count_neg, count_neg * mean_neg, count_neg * (var_neg + mean_neg**2)],
            dtype=torch.float64, device=stats.moments_vec.device,
        )
        return stats

    @property
    def count_pos(self) -> torch.Tensor:
        return self.moments_vec[0]

    @property
    def count_neg(self) -> torch.Tensor:
        return self.moments_vec[3]

    def ready(self, min_count: int) -> torch.Tensor:
        """0-dim bool tensor: more than min_count positives were counted (the Bayes rule is on)."""
        return self.moments_vec[0] > min_count

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean_pos, var_pos, mean_neg, var_neg) as float64 0-dim tensors (variances floored at MIN_VAR)."""
        c = self.moments_vec

        def mean_var(n, s, ss):
            n = n.clamp_min(1.0)
            mean = s / n
            return mean, (ss / n - mean**2).clamp_min(MIN_VAR)

        return (*mean_var(c[0], c[1], c[2]), *mean_var(c[3], c[4], c[5]))

    def log_prior_odds(self, prior_ratio: float) -> torch.Tensor:
        """log((1 - prior) / prior) = log(rho - 1), float64 0-dim on the statistics' device: what the posterior
        reads for the prior of a false negative.  The fitted prior where `prior_fit` has weighed pairs (clamped to
        PRIOR_RANGE), else 1 / prior_ratio (the setting)."""
        preset = torch.full((), math.log(prior_ratio - 1), dtype=torch.float64, device=self.prior_sums.device)
        if not self.prior_fit:
            return preset
        pairs, resp = self.prior_sums
        prior = (resp / pairs.clamp_min(1.0)).clamp(*PRIOR_RANGE)
        return torch.where(pairs > 0, torch.log1p(-prior) - prior.log(), preset)

    @staticmethod
    def batch_moments(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None,
                      neg_fit: str = "hardest") -> torch.Tensor:
        """This batch's moments from the in-batch online matrix S = img . txt^T (no gradient).

        A row counts only if it is mutually top-1; it adds S[i, i] as a positive.  Negatives (pairs sharing an id
        are never negatives): neg_fit `hardest`, each counted row's hardest in-batch negative in each direction;
        `all`, every pair of another id.
        """
        with torch.no_grad():
            return _moments(_sims(img, txt), ids, neg_fit)

    def updated(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None,
                e_step: PriorEStep | None = None) -> "SimilarityStats":
        """A copy with this step's moments (and, with prior_fit, the E-step's sums: `e_step(self, S, same_id)`,
        which `fne_dist.weights.prior_e_step` is with the rule bound) added, summed over all ranks with one
        all-reduce; self is unchanged, so a step can sample with them and keep them only once its loss is known to
        be finite."""
        with torch.no_grad():
            s = _sims(img, txt)
            parts = [_moments(s, ids, self.neg_fit)]
            if self.prior_fit:
                if e_step is None:
                    raise ValueError("SimilarityStats(prior_fit=True).updated needs e_step= (fne_dist.weights."
                                     "prior_e_step with the rule bound)")
                parts.append(e_step(self, s, same_id(s, ids)))
            batch = all_reduce(torch.cat(parts).to(self.moments_vec.device))
        keep = self.ema_decay if self.reset == "ema" else 1.0
        new = copy.copy(self)
        new.moments_vec = self.moments_vec * keep + batch[:6]
        if self.prior_fit:
            new.prior_sums = self.prior_sums * keep + batch[6:]
        return new

    def update(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None,
               e_step: PriorEStep | None = None) -> None:
        """Add this step's moments (see `updated`)."""
        new = self.updated(img, txt, ids, e_step)
        self.moments_vec, self.prior_sums = new.moments_vec, new.prior_sums

    def new_epoch(self) -> None:
        """Apply the reset policy at an epoch boundary."""
        if self.reset == "epoch":
            self.moments_vec.zero_()
            self.prior_sums.zero_()

    def state_dict(self) -> dict:
        return {"moments": self.moments_vec.cpu().clone(), "prior_sums": self.prior_sums.cpu().clone(),
                "reset": self.reset, "ema_decay": self.ema_decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore moments saved under the same reset policy and decay (refused otherwise, naming both)."""
        for name in ("reset", "ema_decay"):
            if state[name] != getattr(self, name):
                raise ValueError(f"SimilarityStats: checkpoint {name}={state[name]!r}, this run {name}="
                                 f"{getattr(self, name)!r}; resume with the checkpoint's setting")
        self.moments_vec = state["moments"].to(device=self.moments_vec.device, dtype=torch.float64)
        if "prior_sums" in state:  # checkpoints from before prior_fit hold none
            self.prior_sums = state["prior_sums"].to(device=self.prior_sums.device, dtype=torch.float64)


def _sims(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """The in-batch online matrix S = img . txt^T in float64 (fp32 product)."""
    return (img.float() @ txt.float().T).double()


def _moments(s: torch.Tensor, ids: torch.Tensor | None, neg_fit: str) -> torch.Tensor:
    """The 6 moment sums of one batch's matrix (see `SimilarityStats.batch_moments`)."""
    rows = torch.arange(s.shape[0], device=s.device)
    mutual = (s.argmax(1) == rows) & (s.argmax(0) == rows)
    pos = s.diagonal()
    pos_w = mutual.double()
    if neg_fit == "all":
        neg_w = (~same_id(s, ids)).double()
        negs = s
    else:
        neg_i2t, neg_t2i = (hardest.values for hardest in hardest_in_batch(s, ids))
        negs = torch.stack([neg_i2t, neg_t2i])
        neg_w = pos_w * torch.isfinite(negs)
        negs = torch.where(neg_w > 0, negs, torch.zeros_like(negs))
    return torch.stack([
        pos_w.sum(), (pos_w * pos).sum(), (pos_w * pos**2).sum(),
        neg_w.sum(), (neg_w * negs).sum(), (neg_w * negs**2).sum(),
    ])
