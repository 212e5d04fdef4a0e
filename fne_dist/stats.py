"""Gaussian statistics of positive and negative similarity (FNE_SPEC step 6), exact and rank-merged."""
from __future__ import annotations

import copy

import torch

from fne_dist.distributed import all_reduce
from fne_dist.losses import hardest_in_batch

RESET_POLICIES = ("epoch", "never", "ema")
MIN_VAR = 1e-8


class SimilarityStats:
    """Exact moments (count, sum, sum of squares) of positive and negative similarities.

    Moments are float64 tensors on the features' device; `update` never synchronises with the host.
    Reset policy: `epoch` clears them at each `new_epoch()` (the released code), `never` keeps them,
    `ema` multiplies the old moments by `ema_decay` before adding each step's (an exponentially
    weighted window whose effective count is what `ready` compares with min_count).
    """

    def __init__(self, reset: str = "epoch", ema_decay: float = 0.99, device: torch.device | str = "cpu"):
        if reset not in RESET_POLICIES:
            raise ValueError(f"SimilarityStats reset={reset!r} is unknown: use one of {RESET_POLICIES}")
        if reset == "ema" and not 0 < ema_decay < 1:
            raise ValueError(f"SimilarityStats ema_decay={ema_decay} must lie in (0, 1)")
        self.reset = reset
        self.ema_decay = ema_decay
        # [count_pos, sum_pos, sumsq_pos, count_neg, sum_neg, sumsq_neg]
        self.moments_vec = torch.zeros(6, dtype=torch.float64, device=device)

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

    @staticmethod
    def batch_moments(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """This batch's moments from the in-batch online matrix S = img . txt^T (no gradient).

        A row counts only if it is mutually top-1; it adds S[i, i] as a positive and its hardest
        in-batch negative in each direction as two negatives (pairs sharing an id are not negatives).
        """
        with torch.no_grad():
            s = (img.float() @ txt.float().T).double()
            rows = torch.arange(s.shape[0], device=s.device)
            mutual = (s.argmax(1) == rows) & (s.argmax(0) == rows)
            pos = s.diagonal()
            neg_i2t, neg_t2i = (hardest.values for hardest in hardest_in_batch(s, ids))
            pos_w = mutual.double()
            negs = torch.stack([neg_i2t, neg_t2i])
            neg_w = pos_w * torch.isfinite(negs)
            negs = torch.where(neg_w > 0, negs, torch.zeros_like(negs))
            return torch.stack([
                pos_w.sum(), (pos_w * pos).sum(), (pos_w * pos**2).sum(),
                neg_w.sum(), (neg_w * negs).sum(), (neg_w * negs**2).sum(),
            ])

    def updated(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None) -> "SimilarityStats":
        """A copy with this step's moments added (summed over all ranks with one all-reduce); self is unchanged, so
        a step can sample with them and keep them only once its loss is known to be finite."""
        batch = all_reduce(self.batch_moments(img, txt, ids).to(self.moments_vec.device))
        new = copy.copy(self)
        new.moments_vec = (self.moments_vec * self.ema_decay if self.reset == "ema" else self.moments_vec) + batch
        return new

    def update(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Add this step's moments (see `updated`)."""
        self.moments_vec = self.updated(img, txt, ids).moments_vec

    def new_epoch(self) -> None:
        """Apply the reset policy at an epoch boundary."""
        if self.reset == "epoch":
            self.moments_vec.zero_()

    def state_dict(self) -> dict:
        return {"moments": self.moments_vec.cpu().clone(), "reset": self.reset, "ema_decay": self.ema_decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore moments saved under the same reset policy and decay (refused otherwise, naming both)."""
        for name in ("reset", "ema_decay"):
            if state[name] != getattr(self, name):
                raise ValueError(f"SimilarityStats: checkpoint {name}={state[name]!r}, this run {name}="
                                 f"{getattr(self, name)!r}; resume with the checkpoint's setting")
        self.moments_vec = state["moments"].to(device=self.moments_vec.device, dtype=torch.float64)
