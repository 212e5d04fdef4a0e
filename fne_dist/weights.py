"""The elementwise FNE rule (FNE_SPEC step 7), written once for torch.

Every sampler (dense reference, streaming torch, fused Triton) is tested against `fne_weights`, and `fne_weights`
against the released rule computed by hand (tests/test_weights.py).  The posterior's log-odds are one quadratic in s
(`log_odds_coefficients`), so no candidate forms the two Gaussian densities (one sigmoid where they took two
exponentials and a division); where the released rule's fp32 positive density underflows, the hardness weight stays
as it does there (`positive_underflow_radius`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fne_dist.stats import SimilarityStats

MODES = ("official", "bayes", "eliminate", "hardness")
CUTDOWNS = ("global", "anchor", "off")
IMPLS = ("auto", "dense", "torch", "triton")  # the samplers of this rule (fne.sample_negatives)
LOG_UNDERFLOW = -150.0 * math.log(2.0)  # exp(x) in fp32 (correctly rounded, denormals kept) is 0 below this


@dataclass(frozen=True)
class FNEConfig:
    """Hyper-parameters of the sampling rule; the defaults are the released code's."""

    margin: float = 0.2
    tau: float = 0.5
    prior_ratio: float = 10000.0
    false_margin: float = 0.999
    min_count: int = 200
    mode: str = "official"
    cutdown: str = "global"
    f_max: float = 0.5  # eliminate mode: candidates whose false-negative probability f >= f_max are dropped

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"FNEConfig.mode={self.mode!r} is unknown: use one of {MODES}")
        if self.cutdown not in CUTDOWNS:
            raise ValueError(f"FNEConfig.cutdown={self.cutdown!r} is unknown: use one of {CUTDOWNS}")
        if not self.tau > 0:
            raise ValueError(f"FNEConfig.tau={self.tau} must be > 0 (the hardness weight exp(-tau*(s-p)^2))")
        if not self.prior_ratio > 1:
            raise ValueError(f"FNEConfig.prior_ratio={self.prior_ratio} must be > 1 (the prior of a false negative is "
                             "1/prior_ratio)")
        if not 0 < self.false_margin < 1:
            raise ValueError(f"FNEConfig.false_margin={self.false_margin} must lie in (0, 1)")
        if not self.margin >= 0:
            raise ValueError(f"FNEConfig.margin={self.margin} must be >= 0")
        if not 0 < self.f_max <= 1:
            raise ValueError(f"FNEConfig.f_max={self.f_max} must lie in (0, 1] (eliminate drops candidates with "
                             "f >= f_max)")
        if self.min_count < 0:
            raise ValueError(f"FNEConfig.min_count={self.min_count} must be >= 0")


def moments32(stats: "SimilarityStats", device) -> tuple[torch.Tensor, ...]:
    """(mean_pos, var_pos, mean_neg, var_neg) in fp32 on `device`: what the elementwise rule reads, computed once per
    call from the float64 moments."""
    return tuple(t.to(device=device, dtype=torch.float32) for t in stats.moments())


def global_cutdown_on(stats: "SimilarityStats", cfg: FNEConfig) -> torch.Tensor:
    """0-dim bool: whether the global cut-down `s <= mu+ - margin` applies.  official and hardness cut from the first
    counted positive, as the released code does (before it the mean is 0/0 and nothing is cut); bayes and eliminate
    wait until the posterior is on."""
    return stats.count_pos > 0 if cfg.mode in ("official", "hardness") else stats.ready(cfg.min_count)


def true_negative_prob(sims: torch.Tensor, stats: "SimilarityStats", cfg: FNEConfig) -> torch.Tensor:
    """1 - f, the posterior probability that each candidate is a true negative (fp32, same shape as sims).

    1 - f = sigmoid(-x) with x = log(f / (1 - f)) the quadratic of `log_odds_coefficients`, so it is finite for any
    s; it is 1 everywhere until the statistics hold more than `cfg.min_count` positives.  The weights of every mode,
    the (1 - f) hinge weight and the posterior-weighted InfoNCE all read that one quadratic."""
    return false_negative_log_odds(sims, log_odds_coefficients(stats, cfg, sims.device)).neg_().sigmoid_()


def positive_underflow_radius(stats: "SimilarityStats", device) -> torch.Tensor:
    """r+ (fp32, on `device`): where |s - mu+| > r+ the positive density exp(-(s - mu+)^2 / (2 var+)) /
    sqrt(2 pi var+), formed in fp32 as the released rule forms it, is 0 (a correctly rounded fp32 exp is 0 below
    LOG_UNDERFLOW), so its f is 0, or 0/0 where the negative density is 0 too, and the hardness weight stays."""
    var_pos = moments32(stats, device)[1]
    return torch.sqrt((-LOG_UNDERFLOW - 0.5 * torch.log(2 * math.pi * var_pos)) * 2 * var_pos)


def log_odds_coefficients(stats: "SimilarityStats", cfg: FNEConfig, device) -> torch.Tensor:
    """[mu+, a, b, c] in fp32 on `device` such that log(f / (1 - f)) = (a d + b) d + c with d = s - mu+: the two
    Gaussians' log-densities are quadratics in s, so `true_negative_prob` is sigmoid(-((a d + b) d + c)) and
    log(1 - f) = -softplus((a d + b) d + c): one sigmoid or softplus per candidate instead of two densities (every
    reader of the posterior: `fne_weights`, `true_negative_prob`, the streaming InfoNCE, the fused kernels' log2
    parameters).

    Computed in float64 from the moments by device ops (no host sync), centred on mu+ where the posterior matters
    so that fp32 keeps its rounding small.  Until the statistics are ready a = b = 0 and c = -inf (1 - f = 1)."""
    mean_pos, var_pos, mean_neg, var_neg = stats.moments()
    delta = mean_pos - mean_neg
    # log L+ - log L- - log(rho - 1), with s - mu- = d + delta
    a = 1 / (2 * var_neg) - 1 / (2 * var_pos)
    b = delta / var_neg
    c = delta * delta / (2 * var_neg) + 0.5 * torch.log(var_neg / var_pos) - stats.log_prior_odds(cfg.prior_ratio)
    ready = stats.ready(cfg.min_count)
    off = lambda value, idle: torch.where(ready, value, torch.full_like(value, idle))  # noqa: E731
    return torch.stack([mean_pos, off(a, 0.0), off(b, 0.0), off(c, -math.inf)]).to(device=device, dtype=torch.float32)


def false_negative_log_odds(sims: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """x = log(f / (1 - f)) = (a d + b) d + c, d = s - mu+, from `log_odds_coefficients` (fp32, shape of sims): a
    few passes over a tile where the densities' form takes a dozen; 1 - f = sigmoid(-x), log(1 - f) = -softplus(x)."""
    mean_pos, a, b, c = coefficients
    d = sims.float() - mean_pos
    return d.mul(a).add_(b).mul_(d).add_(c)


def prior_e_step(cfg: FNEConfig, stats: "SimilarityStats", sims: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """The E-step of the prior fit (fne.prior_fit; SimilarityStats' PriorEStep with cfg bound): [pairs, sum of
    responsibilities] over the in-batch pairs of another id (`same`: [b, b] one pair or one id), each pair's
    responsibility of the false-negative component being its posterior f under `stats` (Gaussians and prior so
    far); nothing before the statistics are ready."""
    weight = (~same).double() * stats.ready(cfg.min_count).to(sims.device)
    resp = 1 - true_negative_prob(sims, stats, cfg).double()
    return torch.stack([weight.sum(), (weight * resp).sum()])


def fne_weights(
    sims: torch.Tensor,
    pos_sims: torch.Tensor,
    pos_mask: torch.Tensor,
    stats: "SimilarityStats",
    cfg: FNEConfig,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampling weights [B, N] in fp32 after the mask and the cut-down, before the fallback.

    sims [B, N] anchor-candidate similarities, pos_sims [B] each anchor's positive similarity,
    pos_mask [B, N] True where the candidate shares the anchor's id, valid [N] or [B, N] (None: all valid).
    The posterior replaces the hardness weight once `stats` hold more than `cfg.min_count` positives.
    The global cut-down `s <= mu+ - margin`: official and hardness apply it at every step with the running mean of
    the positives, as the released code does (nothing is cut before the first positive is counted: its mean is
    0/0 there); bayes and eliminate wait until the posterior is on.
    """
    s = sims.float()
    p = pos_sims.float()[:, None]
    hard_exponent = (s - p).square_()  # the hardness weight is exp(-tau * this)
    mean_pos = moments32(stats, s.device)[0]
    if cfg.mode == "official":
        # The released rule: w = exp(-tau f) where 1 - f < false_margin, else h.  It forms f from the two fp32
        # densities, so where the positive one underflows to 0 its f is 0 (or 0/0 = NaN) and h stays: kept here by
        # the radius beyond which it does.  Both branches are exp(-tau * x): one exp serves them.
        log_odds = false_negative_log_odds(s, log_odds_coefficients(stats, cfg, s.device))  # -inf until ready
        posterior = (log_odds > math.log((1 - cfg.false_margin) / cfg.false_margin)) & (
            (s - mean_pos).square_() <= positive_underflow_radius(stats, s.device).square())
        w = torch.where(posterior, log_odds.sigmoid_(), hard_exponent).mul_(-cfg.tau).exp_()
    else:
        w = hard_exponent.mul_(-cfg.tau).exp_()
        if cfg.mode == "bayes":
            w = w.mul_(true_negative_prob(s, stats, cfg))
        elif cfg.mode == "eliminate":
            w = w.masked_fill_(true_negative_prob(s, stats, cfg) <= 1 - cfg.f_max, 0.0)
    drop = pos_mask
    if valid is not None:
        drop = drop | ~valid
    if cfg.cutdown == "global":
        drop = drop | (global_cutdown_on(stats, cfg).to(s.device) & (s <= mean_pos - cfg.margin))
    elif cfg.cutdown == "anchor":
        drop = drop | (s <= p - cfg.margin)
    return w.masked_fill(drop, 0.0)


def fallback_scores(sims: torch.Tensor, pos_mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Scores whose row argmax is the fallback negative: the similarity, -inf on positives and invalid slots.

    The spec's fallback is argmax_j max(0, margin + s_ij - p_i); margin and p_i are constant along a row, so
    wherever any candidate violates the margin this argmax is the same column, and where none does it is
    still the hardest negative rather than an arbitrary zero-cost column (or a positive).
    """
    drop = pos_mask if valid is None else pos_mask | ~valid
    return sims.float().masked_fill(drop, float("-inf"))
