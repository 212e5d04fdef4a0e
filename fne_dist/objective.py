"""The loss of one training step from the step's features (FNE_SPEC steps 3-10), and the state it reads.

`Objective` owns the per-rank FNE state (the negative buffer, similarity statistics, the sampling rule) and hands
online features `ia, ta` (with gradient) and keys `ik, tk` to the objective class that `fne.objective` names
(fne_dist.objectives: fne, vsepp, clip, posterior_infonce, clip_queue, soft_clip).  The keys are the momentum
towers' (`fne.keys=momentum`, the caller computes them) or the online features detached (`fne.keys=online`, formed
here): constants either way, so every objective and the buffer treat them alike.  What an objective does not read
is not built: no buffer for one that reads none (`reads_buffer`), no momentum keys for one that reads only ids
(`reads_keys`; `momentum_keys` tells the caller).  It knows nothing about DeepSpeed, data or towers, so the
trainer, `fne-bench step` and the study share it.  `loss` changes no state: it returns this step's keys and
statistics, and the caller `commit`s them (enqueue, new statistics) only once the step is known to be finite, after
the optimizer step.

The objectives never treat two pairs of one key as negatives of each other.  The key is the image id; with
`fne.oracle` it is the group label (`identity_keys`), so one substitution makes every objective drop the true false
negatives (same label, another image) in-batch and over the buffer (whose slots keep the keys they were enqueued
with): an upper bound on what eliminating false negatives can gain, measured only where labels are known.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fne_dist.buffer import NegativeBuffer
from fne_dist.config import FNESection, queue_dtype
from fne_dist.distributed import all_reduce
from fne_dist.distributed import rank as this_rank
from fne_dist.distributed import world_size
from fne_dist.objectives import objective_class
from fne_dist.objectives.base import StepFeatures
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats
from fne_dist.weights import prior_e_step


@dataclass
class StepLoss:
    loss: torch.Tensor  # 0-dim, with gradient into ia and ta (and the logit scale for objectives that are `scaled`)
    keys: GlobalKeys  # this step's global keys (momentum, or online detached), to enqueue after the step
    stats: SimilarityStats  # the statistics with this step's moments (sampled with), to keep after the step
    diagnostics: torch.Tensor  # [len(DIAGNOSTICS)] float64 sums over this rank's anchors (both directions)
    index: torch.Tensor | None = None  # [2, b] the drawn global columns per direction (NO_NEGATIVE where none)


def identity_keys(ids: torch.Tensor, labels: torch.Tensor, oracle: bool) -> torch.Tensor:
    """[b] keys that the objectives mask like one image: the image ids, or with the oracle the group labels (an
    image id has one label, so pairs of one image still share a key).  The oracle needs every pair's label."""
    if not oracle:
        return ids
    if bool((labels < 0).any()):
        raise ValueError("fne.oracle=true masks false negatives by label, and this batch has pairs without one: "
                         "give every pair a label (the shards' json 'label'; fne-make-shards table --label-column) "
                         "or set fne.oracle=false")
    return labels


class Objective:
    """The FNE state of one rank (its part of the negative buffer, rank-merged statistics) and the per-step loss."""

    def __init__(self, cfg: FNESection, dim: int, device: torch.device, seed: int):
        self.cfg = cfg
        self.rule = cfg.rule()
        self.seed = seed
        cls = objective_class(cfg.objective)
        self.buffer = NegativeBuffer(cfg.queue_size, dim, queue_dtype(cfg, device), device, layout=cfg.buffer,
                                     rank=this_rank(), world=world_size()) if cls.reads_buffer else None
        self.stats = SimilarityStats(reset=cfg.stats_reset, ema_decay=cfg.ema_decay, device=device,
                                     neg_fit=cfg.neg_fit, prior_fit=cfg.prior_fit)
        self.e_step = functools.partial(prior_e_step, self.rule)  # the prior fit's E-step (fne.prior_fit)
        self.takes_momentum_keys = momentum_keys(cfg)  # fixed by the config: looked up once, not every step
        # an objective that reads neither keys nor a buffer (clip, vsepp) needs only the global batch's ids and
        # labels (the oracle's mask, the diagnostics): its gather moves no features (ClipLoss gathers its own)
        self.gathers_features = cls.reads_keys or cls.reads_buffer
        state = (cfg, self.rule, self.buffer, seed)
        self.step_objective = cls(*state)
        self.warmup_objective = cls.warmup(*state) if cls.warmup else None
        self.told: set[str] = set()  # the milestones `news` has reported

    @property
    def scaled(self) -> bool:
        """The objective uses the model's logit scale (a temperature); the others keep it frozen."""
        return self.step_objective.scaled

    def loss(self, ia, ta, ik, tk, ids, labels, *, step: int, rank: int, warmup: bool,
             logit_scale: torch.Tensor | None = None, epoch: int | None = None) -> StepLoss:
        """This rank's loss over its b anchors.  ik, tk: the momentum towers' keys, required where
        `momentum_keys(cfg)`, None with fne.keys=online; the keys are otherwise ia, ta detached (an objective that
        reads no keys ignores any it is given, and one that reads neither keys nor a buffer gets the global batch's
        ids and labels with keys of no features, [G, 0]).  warmup: an objective with a warm-up (fne: VSE++ in-batch,
        FNE_SPEC step 9) runs that instead, with the statistics unchanged; logit_scale: exp of the model's logit
        scale (with gradient), required by `scaled` objectives; epoch: the training epoch (0-based), required by
        objectives that switch a term on at an epoch (clip_queue)."""
        if self.scaled and logit_scale is None:
            raise ValueError(f"objective {self.cfg.objective!r} needs the model's logit_scale (exp'd): pass "
                             "logit_scale=")
        if self.cfg.keys == "online" and (ik is not None or tk is not None):
            raise ValueError("fne.keys='online': pass ik=tk=None (the keys are the online features, detached)")
        if not self.takes_momentum_keys:
            ik, tk = ia.detach(), ta.detach()
        elif ik is None or tk is None:
            raise ValueError(f"fne.keys='momentum' with fne.objective={self.cfg.objective!r}: pass the momentum "
                             "towers' keys ik, tk (or set fne.keys=online)")
        keys_of = identity_keys(ids, labels, self.cfg.oracle)
        width = None if self.gathers_features else 0  # 0: the gathered keys are ids and labels only
        keys = GlobalKeys.gather(ik[:, :width], tk[:, :width], keys_of, labels)
        warming = warmup and self.warmup_objective is not None
        # the statistics are fitted on the image ids, so an oracle run differs from its base only in the mask
        stats = self.stats if warming else self.stats.updated(ia, ta, ids, self.e_step)
        features = StepFeatures(ia, ta, ik, tk, keys_of, labels, keys, stats, step, rank, logit_scale, epoch)
        out = (self.warmup_objective if warming else self.step_objective)(features)
        return StepLoss(out.loss, keys, stats, out.diagnostics, out.index)

    def commit(self, out: StepLoss) -> None:
        """Keep a finished step's statistics and enqueue its keys (FNE_SPEC step 10) where there is a buffer."""
        self.stats = out.stats
        if self.buffer is not None:
            self.buffer.enqueue(out.keys)

    def news(self) -> list[str]:
        """Milestones reached since the last call, for the log: the buffer became full, the posterior switched on
        (where the objective uses one).  Collective (one all-reduce, where there is a buffer) with a host sync: call
        it where the log syncs anyway, on every rank."""
        events = {}
        if self.buffer is not None:
            valid = self.buffer.queue.valid
            full = all_reduce(torch.tensor([float(not valid.all())], device=valid.device))
            events["buffer"] = (bool(full.item() == 0),
                                f"the negative buffer is full ({self.cfg.queue_size} keys, fne.queue_size)")
        events["posterior"] = (uses_posterior(self.cfg) and bool(self.stats.ready(self.cfg.min_count)),
                               f"the posterior is on: {float(self.stats.count_pos):.0f} positives counted, more "
                               f"than fne.min_count={self.cfg.min_count}")
        new = [name for name, (reached, _) in events.items() if reached and name not in self.told]
        self.told.update(new)
        return [events[name][1] for name in new]

    def posterior_off(self) -> str | None:
        """Where the objective uses the posterior and it is still off: what to read in the log and do (host sync)."""
        if not uses_posterior(self.cfg) or bool(self.stats.ready(self.cfg.min_count)):
            return None
        return (f"the posterior is still off: {float(self.stats.count_pos):.0f} positives counted, it switches on "
                f"above fne.min_count={self.cfg.min_count}; on a small set lower fne.min_count")


def uses_posterior(cfg: FNESection) -> bool:
    """The objective weighs by FNE's posterior, which switches on above fne.min_count positives."""
    return objective_class(cfg.objective).uses_posterior(cfg)


def momentum_keys(cfg: FNESection) -> bool:
    """The step takes the momentum towers' keys: fne.keys=momentum and an objective that reads keys (clip and vsepp
    read only ids: they run no momentum towers whatever fne.keys says)."""
    return cfg.keys == "momentum" and objective_class(cfg.objective).reads_keys


def unused_settings(cfg: FNESection) -> list[str]:
    """Log lines for the settings this objective leaves unused, so that a config is not read as costing what it
    does not: the buffer's where it reads none, the momentum towers' where it reads no keys."""
    cls, lines = objective_class(cfg.objective), []
    if not cls.reads_buffer:
        lines.append(f"fne.objective={cfg.objective} reads no negative buffer: none is held, enqueued or "
                     f"checkpointed (fne.queue_size={cfg.queue_size}, fne.buffer and fne.queue_dtype are unused)")
    if cfg.keys == "momentum" and not cls.reads_keys:
        lines.append(f"fne.objective={cfg.objective} reads no keys: no momentum towers are built or run "
                     "(fne.keys=momentum and fne.momentum are unused)")
    return lines


def sizing_advice(cfg: FNESection, *, epoch_pairs: int, global_batch: int, total_steps: int) -> list[str]:
    """Warnings, each with the value to use, where the fne settings do not fit a set of `epoch_pairs` training
    pairs: a queue longer than an epoch (where the objective reads one: it then holds each pair's key several times,
    and may never fill), and a min_count that the run cannot reach (at most a global batch of positives is counted
    per step, none in warm-up)."""
    advice, objective = [], objective_class(cfg.objective)
    fitting = max(global_batch, (epoch_pairs - global_batch) // global_batch * global_batch)
    if objective.reads_buffer and cfg.queue_size > epoch_pairs:
        fills = -(-cfg.queue_size // global_batch)
        when = f"fills after {fills} steps" if fills <= total_steps else \
            f"never fills in this run's {total_steps} steps"
        advice.append(f"fne.queue_size={cfg.queue_size} is longer than the {epoch_pairs} pairs of an epoch: the "
                      f"buffer {when} and holds keys of the same pairs several times; set "
                      f"fne.queue_size={fitting} (an epoch's pairs less a global batch)")
    if uses_posterior(cfg):
        steps_per_epoch = max(1, epoch_pairs // global_batch)
        warmup_epochs = cfg.warmup_epochs if objective.warmup else 0
        counting = total_steps - warmup_epochs * steps_per_epoch
        if cfg.stats_reset == "epoch":
            counting = min(counting, steps_per_epoch)
        most = max(0, counting) * global_batch
        if most == 0:
            advice.append(f"the run's {total_steps} steps are all fne.warmup_epochs={cfg.warmup_epochs} warm-up, so "
                          "the posterior never switches on; train more epochs than fne.warmup_epochs")
        elif cfg.min_count >= most:
            advice.append(f"fne.min_count={cfg.min_count} cannot be reached: at most {most} positives are counted "
                          f"{'in an epoch' if cfg.stats_reset == 'epoch' else 'in this run'} (one per mutually "
                          f"top-1 pair, none in warm-up), so the posterior never switches on; set "
                          f"fne.min_count={max(1, most // 4)} or train longer")
    return advice
