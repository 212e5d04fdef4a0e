"""The towers: open_clip models by name or JSON, what the optimizer sees."""
import pytest
import torch

from conftest import TINY
from fne_dist.config import ModelSection
from fne_dist.model import build_towers, encode, freeze_temperature, param_groups
from fne_dist.momentum import momentum_copy


def test_json_model_builds_with_transforms_and_tokenizer(tiny_towers):
    arch = tiny_towers.architecture
    assert arch["embed_dim"] == 64 and arch["vision_cfg"]["image_size"] == 32
    assert tiny_towers.model.logit_scale.shape == (1,)  # DeepSpeed cannot flatten 0-dim parameters
    tokens = tiny_towers.tokenizer(["the digit seven, leaning left"])
    ia, ta, _ = encode(tiny_towers.model, torch.randn(1, 3, 32, 32), tokens)
    assert ia.shape == ta.shape == (1, 64)
    assert torch.allclose(ia.norm(dim=1), torch.ones(1)) and torch.allclose(ta.norm(dim=1), torch.ones(1))


def test_embed_dim_override_reaches_architecture():
    towers = build_towers(ModelSection(name=TINY, embed_dim=32))
    assert towers.architecture["embed_dim"] == 32 and towers.model.text_projection.shape[1] == 32


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"model\.name='ViT-B-61'.*did you mean"):
        build_towers(ModelSection(name="ViT-B-61"))
    with pytest.raises(FileNotFoundError, match=r"model-config JSON"):
        build_towers(ModelSection(name="nowhere/tiny.json"))
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained='missing\.pt' is not a file"):
        build_towers(ModelSection(name=TINY, pretrained="missing.pt"))


def test_temperature_is_frozen_and_gains_get_no_weight_decay(tiny_towers):
    model = momentum_copy(tiny_towers.model).requires_grad_(True)
    freeze_temperature(model)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "logit_scale" not in {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("ln_final.weight") for p in no_decay["params"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for g in (decay, no_decay) for p in g["params"])
