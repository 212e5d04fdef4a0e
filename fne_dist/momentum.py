"""The momentum towers (FNE_SPEC step 2): an fp32 copy of the online towers that no optimizer sees, moved towards
the online weights once per optimizer step (an exponential moving average, EMA), before the next step's keys.

The momentum towers stay fp32 (a 0.5% step is below bf16's resolution) and read the online weights in their own
dtype: no fp32 copy of the model per step.

ZeRO 0-2: a plain module, whole on every rank, beside the DeepSpeed engine.

ZeRO-3: the online towers are partitioned across ranks, and so are the momentum towers.  `shard_momentum` hands
the copy to DeepSpeed's ZeRO-3 inference path (an engine without an optimizer, which DeepSpeed backs with
`DeepSpeedZeRoOffload`): each parameter is flattened, padded and split, every rank keeping its 1/world partition
(`param.ds_tensor`, fp32), and the forward gathers the parameters module by module and releases them after use, as
for the online towers.  ZeRO-3 splits every parameter on its own by the same rule, so a rank's partition of a
momentum parameter holds the same elements as its partition of the online one: the EMA is a local update of
partitions, with no collective.  It reads the online partitions that the forward gathers (`ds_tensor`, in the compute
dtype, which DeepSpeed refreshes from its fp32 master weights after every optimizer step), as ZeRO 0-2 read the
module's weights; not the optimizer's fp32 master partitions, whose flat layout (sub-groups, CPU/NVMe offload) is
DeepSpeed's internal business.  Checkpoints hold every rank's partitions (`partition_state`), for the same world size.

Frozen pretrained trunks (`TrunkTap`): the momentum trunks compute what the online ones do, so the momentum keys
are the momentum heads applied to the online forward's pooled trunk outputs: one trunk pass per step, not two.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

PERSISTENCE_THRESHOLD = 0  # no momentum parameter stays gathered between forwards (the EMA updates partitions)


class TrunkTap:
    """Keys from the online forward's trunk outputs, where both pretrained trunks are frozen.

    A frozen trunk is a fixed function, and the EMA of a weight towards itself leaves it unchanged (a lerp between
    equal values is exact), so the momentum trunks hold the online trunks' weights: the momentum keys are the
    momentum heads on the pooled features the online trunks just computed (kept by forward hooks).  In a bf16 run
    the features are those of the bf16 online trunk, where the momentum towers would have run their fp32 copy
    under autocast."""

    def __init__(self, online: nn.Module):
        self.features: dict[str, torch.Tensor] = {}
        online.visual.trunk.register_forward_hook(self._keep("image"))
        online.text.pooler.register_forward_hook(self._keep("text"))

    def _keep(self, tower: str):
        def hook(module, args, output):
            self.features[tower] = output.detach()
        return hook

    def momentum_keys(self, momentum: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(image keys, text keys) of the batch the online towers last ran, from the momentum heads (a ZeRO-3
        engine's module hooks gather them)."""
        from fne_dist.pretrained import project_image, project_text

        momentum = getattr(momentum, "module", momentum)
        image, text = self.features.pop("image"), self.features.pop("text")
        return project_image(momentum, image), project_text(momentum, text)


def is_zero3(engine) -> bool:
    """The DeepSpeed engine partitions the online towers (ZeRO-3), so the momentum towers are partitioned too."""
    return engine.zero_optimization_stage() == 3


def momentum_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of the online towers that no optimizer sees (requires_grad False), in eval mode."""
    momentum = copy.deepcopy(model).float().eval()
    return momentum.requires_grad_(False)


def shard_momentum(momentum: nn.Module, zero_config: dict) -> nn.Module:
    """ZeRO-3: partition the momentum towers across ranks like the online ones (collective: call it on every rank).

    Returns DeepSpeed's engine around them (call it for the forward, as the online engine).  zero_config: the online
    engine's `zero_optimization` section, whose parameter offload the momentum towers share (their partitions live
    where the online ones do); no momentum parameter persists gathered (`PERSISTENCE_THRESHOLD`).  No bf16/fp16
    section: the towers stay fp32.

    `overlap_comm` off: DeepSpeed then gathers on the default stream, where the EMA (and a resume) writes the
    partitions.  With it on (stage 3's default) the gathers copy the partitions out on DeepSpeed's own stream, which
    never waits for the default one, so the momentum forward could read partitions the EMA has not finished.  The
    collectives themselves still run on NCCL's own stream, so a prefetch still overlaps the compute queued after it.
    """
    import deepspeed

    zero = {"stage": 3, "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD, "overlap_comm": False}
    if "offload_param" in zero_config:
        zero["offload_param"] = zero_config["offload_param"]
    config = {"train_micro_batch_size_per_gpu": 1,  # never trained: the batch settings are unused
              "steps_per_print": 2**31 - 1, "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=momentum, config=config)
    engine.eval()
    return engine


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float, zero3: bool = False) -> None:
    """theta_m = m * theta_m + (1 - m) * theta for every parameter; buffers (e.g. BatchNorm statistics) are copied.

    Parameters of the same dtype move in one multi-tensor lerp; bf16 online weights are added into the fp32 targets
    tensor by tensor (torch promotes inside the add).
    zero3: both towers are ZeRO-3 partitioned (`momentum` is `shard_momentum`'s engine): each rank updates its own
    partitions.
    """
    if zero3:
        _release(momentum)
    targets = [_local(p, zero3) for p in momentum.parameters()]
    sources = [_local(p, zero3) for p in online.parameters()]
    if len(targets) != len(sources):
        raise ValueError(f"momentum towers have {len(targets)} parameters, the online towers {len(sources)}")
    if any(t.shape != s.shape for t, s in zip(targets, sources)):
        raise ValueError("the momentum towers' parameters (or ZeRO-3 partitions) differ in shape from the online "
                         "towers': both must be built from the same model and partitioned over the same ranks")
    same = [(t, s) for t, s in zip(targets, sources) if t.dtype == s.dtype]
    mixed = [(t, s) for t, s in zip(targets, sources) if t.dtype != s.dtype]
    if same:
        torch._foreach_lerp_(*map(list, zip(*same)), 1 - m)
    if mixed:
        mixed_targets, mixed_sources = map(list, zip(*mixed))
        torch._foreach_mul_(mixed_targets, m)
        torch._foreach_add_(mixed_targets, mixed_sources, alpha=1 - m)
    for b_m, b in zip(momentum.buffers(), online.buffers(), strict=True):
        b_m.copy_(b)


def _local(param: nn.Parameter, zero3: bool) -> torch.Tensor:
    """What this rank holds of a parameter: the whole tensor, or (ZeRO-3) its flat partition."""
    return param.ds_tensor if zero3 else param.detach()


def _release(momentum: nn.Module) -> None:
    """A gathered momentum parameter would keep its stale full copy after the EMA moved its partition: release any
    that a forward left gathered (none is expected: nothing persists, and every module releases its own)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if any(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in momentum.parameters()):
        momentum.empty_partition_cache()


def partition_state(momentum: nn.Module) -> dict:
    """ZeRO-3: what a checkpoint keeps of this rank's momentum towers: its fp32 partitions and the (whole) buffers."""
    return {"partitions": [p.ds_tensor.detach().clone() for p in momentum.parameters()],
            "buffers": [b.detach().clone() for b in momentum.buffers()]}


@torch.no_grad()
def load_partition_state(momentum: nn.Module, state: dict, source: str) -> None:
    """Restore `partition_state` bit for bit into a momentum towers partitioned the same way (same world size)."""
    params, buffers = list(momentum.parameters()), list(momentum.buffers())
    saved, saved_buffers = state["partitions"], state["buffers"]
    shapes = [tuple(p.ds_tensor.shape) for p in params] == [tuple(t.shape) for t in saved]
    if not shapes or len(buffers) != len(saved_buffers):
        raise ValueError(f"{source}: the saved momentum partitions do not fit these towers (another model, or "
                         "another world size: ZeRO-3 partitions are per rank); resume with the checkpoint's "
                         "config and world size")
    _release(momentum)
    for p, t in zip(params, saved):
        p.ds_tensor.copy_(t)
    for b, t in zip(buffers, saved_buffers):
        b.copy_(t)
