"""The image and text towers (any open_clip model), what the optimizer sees of them, and their forward.

The online towers are an open_clip CLIP (or, from pretrained towers, a CustomTextCLIP: a timm image trunk and a
Hugging Face text trunk with linear projection heads, weights from local files through fne_dist/pretrained.py)
built with a 1-element logit scale: DeepSpeed cannot flatten 0-dim parameters, and one builder serves the triplet
objectives (which freeze the scale: a triplet loss has no temperature) and the InfoNCE ones and the CLIP-loss
baseline of `fne-bench step` (which train it).

The momentum towers (their EMA copy, sharded like them under ZeRO-3) are in fne_dist/momentum.py.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from fne_dist import pretrained
from fne_dist.config import ConfigError, ModelSection

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
        raise ConfigError(f"model.name={cfg.name!r} is neither an open_clip model nor a .json model config"
                          + (f": did you mean {close}?" if close else "; see open_clip.list_models()"))
    return cfg.name


def architecture(cfg: ModelSection) -> dict:
    """The open_clip model config (plain JSON types, comparable with a stored copy)."""
    if cfg.image_tower is not None:
        return tower_architecture(cfg)
    arch = copy.deepcopy(open_clip.get_model_config(resolve_name(cfg)))
    if cfg.embed_dim is not None:
        arch["embed_dim"] = cfg.embed_dim
    return json.loads(json.dumps(arch))


def tower_architecture(cfg: ModelSection) -> dict:
    """open_clip's config of a CustomTextCLIP from pretrained towers: timm trunk + linear head, Hugging Face trunk
    (the local folder) + mean pooling + linear head.  The weights are loaded by `build_pretrained_towers`."""
    text_dir = str(pretrained.resolve_weights(cfg.text_tower.weights, "model.text_tower.weights"))
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"timm_model_name": cfg.image_tower.timm_model, "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": cfg.image_tower.image_size},
        "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_model_pretrained": False,
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear",
                     "context_length": cfg.text_tower.context_length},
    }


def build_pretrained_towers(cfg: ModelSection) -> Towers:
    """A CustomTextCLIP whose trunks hold the local pretrained weights (every tensor checked), frozen if asked,
    with the image tower's own normalisation (timm's pretrained config) and a tokenizer of `context_length`."""
    import timm

    arch = tower_architecture(cfg)
    model = open_clip.CustomTextCLIP(**arch, nonscalar_logit_scale=True)
    image, text = cfg.image_tower, cfg.text_tower
    image_file = pretrained.resolve_weights(image.weights, "model.image_tower.weights")
    reference = timm.create_model(image.timm_model, pretrained=False)
    pretrained.load_exact(model.visual.trunk, pretrained.timm_state_dict(image_file, reference), str(image_file),
                          unused=pretrained.UNUSED_IMAGE)
    text_dir = Path(arch["text_cfg"]["hf_model_name"])
    pretrained.load_exact(model.text.transformer, pretrained.hf_state_dict(text_dir), str(text_dir),
                          unused=pretrained.UNUSED_TEXT)
    if image.freeze:
        pretrained.freeze(model.visual.trunk)
    if text.freeze:
        pretrained.freeze(model.text.transformer)
    data_cfg = reference.pretrained_cfg
    preprocess = PreprocessCfg(size=image.image_size, mean=data_cfg["mean"], std=data_cfg["std"],
                               interpolation=data_cfg["interpolation"])
    open_clip.set_model_preprocess_cfg(model, asdict(preprocess))
    preprocess_train = image_transform_v2(preprocess, is_train=True)
    preprocess_val = image_transform_v2(preprocess, is_train=False)
    tokenizer = HFTokenizer(str(text_dir), context_length=text.context_length)
    return Towers(model, preprocess_train, preprocess_val, tokenizer, json.loads(json.dumps(arch)))


def build_towers(cfg: ModelSection) -> Towers:
    """The online CLIP model (fp32, random or from `cfg.pretrained`, or from pretrained towers) and its transforms
    and tokenizer."""
    if cfg.image_tower is not None:
        return build_pretrained_towers(cfg)
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
    """After an optimizer step, as open_clip's training does: 0 <= logit_scale <= log(100), in every copy this rank
    holds.  DeepSpeed steps an fp32 master copy (ZeRO 1-3, or bf16) and copies it over the module's weight at each
    step, so the master is clamped too: else it would climb past the bound, the next step would start from there,
    and the checkpoint and its export (ZeRO-3 exports the master) would hold it.  Each rank clamps what it holds (the
    whole weight, or under ZeRO-3 its partitions and the gathered copy a small parameter persists): no collective.
    DeepSpeed exposes no master copy at ZeRO stage 0 with fp16 (its FP16_Optimizer), where the weight alone is
    clamped."""
    param = model.logit_scale
    param.clamp_(0, MAX_LOGIT_SCALE)  # ZeRO-3: the persisted gathered copy, or an empty tensor
    if zero3:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        param.ds_tensor.clamp_(0, MAX_LOGIT_SCALE)  # what the next gather reads
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp_(0, MAX_LOGIT_SCALE))
    elif getattr(param, "_hp_mapping", None) is not None:  # ZeRO 1-2, bf16: this rank's piece of the fp32 master
        param._hp_mapping.get_hp_fragment().clamp_(0, MAX_LOGIT_SCALE)


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


def encode(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings [b, D] and the exp'd logit scale, through the model's forward
    (which a DeepSpeed engine wraps: under ZeRO-3 its hooks gather the parameters)."""
    image_features, text_features, logit_scale = model(images, tokens)[:3]
    return image_features, text_features, logit_scale
