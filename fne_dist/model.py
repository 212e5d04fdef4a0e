"""The image and text towers (any open_clip model) and their momentum copy.

The online towers are an open_clip CLIP built with a 1-element logit scale: DeepSpeed cannot flatten 0-dim
parameters, and one builder serves the triplet objectives (which freeze the scale: a triplet loss has no
temperature) and the InfoNCE ones and the CLIP-loss baseline of `fne-bench step` (which train it).

The momentum towers (FNE_SPEC step 2) are a plain fp32 copy outside the DeepSpeed engine, never trained by the
optimizer: `momentum_update` moves them towards the online weights before each step's keys are computed.  Under
ZeRO-3 the engine's parameters are partitioned across ranks, so the update reads them inside
`deepspeed.zero.GatheredParameters`, which gathers them for the duration of the update.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import nn

from fne_dist.config import ModelSection

NO_WEIGHT_DECAY = ("bias", "ln", "bn", "logit_scale", "logit_bias")


@dataclass
class Towers:
    """A model with what it needs to read data: train and eval image transforms, tokenizer, architecture."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    architecture: dict  # the open_clip model config, for checking that a checkpoint fits


def resolve_name(cfg: ModelSection) -> str:
    """The open_clip model name; a model-config JSON is registered with open_clip under its file stem."""
    if cfg.name.endswith(".json"):
        path = Path(cfg.name)
        if not path.is_file():
            raise FileNotFoundError(f"model.name={cfg.name!r}: no such model-config JSON file")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(cfg.name) is None:
        close = difflib.get_close_matches(cfg.name, open_clip.list_models(), n=3)
        raise ValueError(f"model.name={cfg.name!r} is neither an open_clip model nor a .json model config"
                         + (f": did you mean {close}?" if close else "; see open_clip.list_models()"))
    return cfg.name


def architecture(cfg: ModelSection) -> dict:
    arch = copy.deepcopy(open_clip.get_model_config(resolve_name(cfg)))
    if cfg.embed_dim is not None:
        arch["embed_dim"] = cfg.embed_dim
    return json.loads(json.dumps(arch))  # plain JSON types, comparable with a stored copy


def build_towers(cfg: ModelSection) -> Towers:
    """The online CLIP model (fp32, random or from `cfg.pretrained`) and its transforms and tokenizer."""
    name = resolve_name(cfg)
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"model.pretrained={cfg.pretrained!r} is not a file: give a local open_clip "
                                "state dict (weights are never downloaded), or null for a random start")
    kwargs = {"nonscalar_logit_scale": True}
    if cfg.embed_dim is not None:
        kwargs["embed_dim"] = cfg.embed_dim
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=cfg.pretrained, pretrained_text=False, **kwargs)
    return Towers(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name), architecture(cfg))


def freeze_temperature(model: nn.Module) -> None:
    """The triplet losses have no temperature: keep the logit scale (and bias) out of training (the objectives
    "clip" and "posterior_infonce" train it, as open_clip does)."""
    for name, param in model.named_parameters():
        if name in ("logit_scale", "logit_bias"):
            param.requires_grad_(False)


MAX_LOGIT_SCALE = math.log(100)  # open_clip's training clamps the learned temperature at 1/100


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, zero3: bool = False) -> None:
    """After an optimizer step, as open_clip's training does: 0 <= logit_scale <= log(100)."""
    param = model.logit_scale
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.clamp_(0, MAX_LOGIT_SCALE)
    else:
        param.clamp_(0, MAX_LOGIT_SCALE)


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Trainable parameters in two groups, open_clip's convention: gains, biases and scales get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.ndim < 2 or any(part in name for part in NO_WEIGHT_DECAY)
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if weight_decay is not None:
        groups[0]["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]


def momentum_copy(model: nn.Module) -> nn.Module:
    """An fp32 copy of the online towers that no optimizer sees (requires_grad False), in eval mode."""
    momentum = copy.deepcopy(model).float().eval()
    return momentum.requires_grad_(False)


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float, zero3: bool = False) -> None:
    """theta_m = m * theta_m + (1 - m) * theta for every parameter; buffers (e.g. BatchNorm statistics) are copied.

    zero3: the online parameters are ZeRO-3 partitions; they are gathered (on every rank: call it on all) first.
    """
    params = list(online.parameters())
    targets = list(momentum.parameters())
    if len(targets) != len(params):
        raise ValueError(f"momentum towers have {len(targets)} parameters, the online towers {len(params)}")
    with _gathered(params) if zero3 else nullcontext():
        # one multi-tensor call per operation instead of two kernels per parameter
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, [p.detach().to(t.dtype) for p, t in zip(params, targets)], alpha=1 - m)
    for b_m, b in zip(momentum.buffers(), online.buffers(), strict=True):
        b_m.copy_(b)


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def encode(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings [b, D] and the exp'd logit scale, through the model's forward
    (which a DeepSpeed engine wraps: under ZeRO-3 its hooks gather the parameters)."""
    image_features, text_features, logit_scale = model(images, tokens)[:3]
    return image_features, text_features, logit_scale
