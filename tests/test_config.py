"""Run configs: every shipped YAML loads; unknown keys, bad types and impossible settings are clear errors."""
from pathlib import Path

import pytest

from fne_dist.config import ConfigError, check_world, differing_keys, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.fne.momentum == 0.995 and cfg.fne.margin == 0.2  # the released code's
    assert cfg.fne.warmup_epochs == (0 if path.name == "demo.yaml" else 1)
    assert isinstance(cfg.deepspeed, dict) and "optimizer" in cfg.deepspeed


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.steps=100", "fne.mode=bayes",
                                                   "deepspeed.zero_optimization.stage=3"])
    assert cfg.train.steps == 100 and cfg.fne.mode == "bayes"
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert cfg.fne.rule().mode == "bayes"


def test_unknown_override_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stepz'.*command-line.*"
                                          r"did you mean 'train\.steps'"):
        load_config(ROOT / "configs/demo.yaml", ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        load_config(ROOT / "configs/demo.yaml", ["trian.steps=3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: x.tar\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"'data\.batchsize' in .*bad\.yaml.*did you mean 'data\.batch_size'"):
        load_config(path)


def test_bad_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'fne\.queue_size'.*'abc'.*takes int"):
        load_config(ROOT / "configs/demo.yaml", ["fne.queue_size=abc"])
    with pytest.raises(ConfigError, match=r"'data\.resampled'.*takes bool"):
        load_config(ROOT / "configs/demo.yaml", ["data.resampled=maybe"])


@pytest.mark.parametrize("override, message", [
    ("fne.mode=bays", r"fne\.mode='bays' is unknown: use one of \('official', 'bayes', 'eliminate', 'hardness'\)"),
    ("fne.queue_dtype=int8", r"fne\.queue_dtype"),
    ("fne.momentum=1.5", r"fne\.momentum=1\.5 must lie in \(0, 1\)"),
    ("train.epochs=0", r"train\.epochs=0 must be >= 1"),
    ("data.epoch_pairs=1000", r"both set the epoch length"),
    ("train.steps", r"must look like section\.key=value"),
])
def test_invalid_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/demo.yaml", ["train.steps_per_epoch=5", override])


def test_missing_train_shards_is_named():
    with pytest.raises(ConfigError, match=r"data\.train"):
        load_config(None, ["train.steps_per_epoch=5"])


def test_queue_smaller_than_global_batch_is_refused():
    cfg = load_config(ROOT / "configs/demo.yaml", ["fne.queue_size=100", "data.batch_size=64"])
    assert check_world(cfg, 1) == 64
    with pytest.raises(ConfigError, match=r"fne\.queue_size=100 is smaller than the global batch 128 "
                                          r"\(2 ranks x data\.batch_size=64\)"):
        check_world(cfg, 2)


def test_differing_keys_names_state_shaping_settings():
    a = to_dict(load_config(ROOT / "configs/demo.yaml"))
    b = to_dict(load_config(ROOT / "configs/demo.yaml", ["fne.queue_size=8192", "fne.mode=bayes", "train.steps=7"]))
    assert differing_keys(a, b) == ["fne.mode: 'official' -> 'bayes'", "fne.queue_size: 4096 -> 8192"]
