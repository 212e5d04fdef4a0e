"""The training objectives, one class each behind one interface (`base.StepObjective`), as open_clip has ClipLoss,
SigLipLoss and CoCaLoss.  `fne_dist.objective.Objective` keeps the per-rank state (buffer, statistics, rule) and hands
each step's features to the class that `fne.objective` names here.

Adding an objective: one class (a `StepObjective`) and one line in REGISTRY.  The registry names classes by
"module:Class" so that the config can list the names without importing the sampler stack (and a class may live
outside the package).
"""
from __future__ import annotations

import importlib

REGISTRY = {
    # FNE's sampled negative, triplet hinge; VSE++ during the warm-up epochs
    "fne": "fne_dist.objectives.triplet:FNETriplet",
    # VSE++'s hardest in-batch negative throughout
    "vsepp": "fne_dist.objectives.triplet:VSEpp",
    # open_clip's ClipLoss: in-batch InfoNCE, learnable temperature
    "clip": "fne_dist.objectives.clip:Clip",
    # InfoNCE over [global batch ; queue], each negative weighted by 1 - f
    "posterior_infonce": "fne_dist.objectives.posterior_infonce:PosteriorInfoNCE",
    # ClipLoss + fne.queue_weight x InfoNCE against the queue, (1 - f)-weighted, from fne.queue_start_epoch
    "clip_queue": "fne_dist.objectives.clip_queue:ClipQueue",
    # in-batch InfoNCE with targets (1 - alpha) one-hot + alpha x the normalised posterior P(positive | s)
    "soft_clip": "fne_dist.objectives.soft_clip:SoftClip",
}


def objective_class(name: str) -> type:
    """The StepObjective class registered as `name` (a value of fne.objective)."""
    if name not in REGISTRY:
        raise ValueError(f"fne.objective={name!r} is unknown: use one of {tuple(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
