"""The towers: open_clip models by name or JSON, what the optimizer sees, and the momentum (EMA) update,
also under ZeRO-3 where the online parameters are partitioned."""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fne_dist.config import ModelSection
from fne_dist.model import build_towers, encode, freeze_temperature, momentum_copy, momentum_update, param_groups

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/models/tiny-vit.json")


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return build_towers(ModelSection(name=TINY))


def test_json_model_builds_with_transforms_and_tokenizer(towers):
    assert towers.architecture["embed_dim"] == 64 and towers.architecture["vision_cfg"]["image_size"] == 32
    assert towers.model.logit_scale.shape == (1,)  # DeepSpeed cannot flatten 0-dim parameters
    tokens = towers.tokenizer(["the digit seven, leaning left"])
    ia, ta, _ = encode(towers.model, torch.randn(1, 3, 32, 32), tokens)
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


def test_temperature_is_frozen_and_gains_get_no_weight_decay(towers):
    model = momentum_copy(towers.model).requires_grad_(True)
    freeze_temperature(model)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "logit_scale" not in {names[id(p)] for g in (decay, no_decay) for p in g["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("ln_final.weight") for p in no_decay["params"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for g in (decay, no_decay) for p in g["params"])


def test_momentum_update_is_the_ema(towers):
    online = towers.model
    momentum = momentum_copy(online)
    assert not any(p.requires_grad for p in momentum.parameters())
    for p in momentum.parameters():
        p.data.normal_()
    before = [p.clone() for p in momentum.parameters()]
    momentum_update(online, momentum, m=0.995)
    for new, old, theta in zip(momentum.parameters(), before, online.parameters()):
        assert torch.allclose(new, 0.995 * old + 0.005 * theta, atol=1e-7, rtol=1e-6)


def test_momentum_update_reads_bf16_online_weights_into_fp32_towers(towers):
    online = copy.deepcopy(towers.model).bfloat16()
    momentum = momentum_copy(towers.model)
    for p in momentum.parameters():
        p.data.normal_()
    before = [p.clone() for p in momentum.parameters()]
    momentum_update(online, momentum, m=0.995)
    for new, old, theta in zip(momentum.parameters(), before, online.parameters()):
        assert new.dtype == torch.float32
        assert torch.allclose(new, 0.995 * old + 0.005 * theta.float(), atol=1e-7, rtol=1e-6)


ZERO3_EMA = textwrap.dedent("""
    import copy, os, torch, deepspeed
    from fne_dist.model import momentum_update
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    theta = [p.detach().clone() for p in model.parameters()]
    momentum = copy.deepcopy(model).requires_grad_(False)
    for p in momentum.parameters():
        p.data.fill_(1.0)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 should have partitioned the weights"
    momentum_update(engine.module, momentum, m=0.9, zero3=True)
    for p_m, t in zip(momentum.parameters(), theta):
        torch.testing.assert_close(p_m, 0.9 + 0.1 * t)
    print("ZERO3-EMA-OK")
""")


def test_momentum_update_gathers_zero3_partitions(tmp_path, port):
    script = tmp_path / "zero3_ema.py"
    script.write_text(ZERO3_EMA)
    env = {**os.environ, "PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert "ZERO3-EMA-OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
