"""Run configs: every shipped YAML loads; unknown keys, bad types and impossible settings are clear errors."""
from dataclasses import replace
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
    assert check_world(replace(cfg, fne=replace(cfg.fne, objective="soft_clip")), 2) == 128  # it holds no queue


def test_differing_keys_names_state_shaping_settings():
    a = to_dict(load_config(ROOT / "configs/demo.yaml"))
    b = to_dict(load_config(ROOT / "configs/demo.yaml", ["fne.queue_size=8192", "fne.mode=bayes", "train.steps=7"]))
    assert differing_keys(a, b) == ["fne.mode: 'official' -> 'bayes'", "fne.queue_size: 4096 -> 8192"]


@pytest.mark.parametrize("override", [
    "fne.margin=0.3", "fne.tau=2.0", "fne.prior_ratio=100", "fne.false_margin=0.99", "fne.min_count=10",
    "fne.momentum=0.9", "fne.keys=online", "fne.ema_decay=0.5", "fne.warmup_epochs=3", "data.workers=2", "data.train=other-{0..3}.tar",
    "data.shuffle_buffer=10", "train.steps_per_epoch=7", "train.seed=5", "deepspeed.gradient_accumulation_steps=2",
])
def test_every_setting_that_shapes_a_resumed_run_is_compared(override):
    a = to_dict(load_config(ROOT / "configs/demo.yaml"))
    b = to_dict(load_config(ROOT / "configs/demo.yaml", [override]))
    assert [d.split(":")[0] for d in differing_keys(a, b)] == [override.split("=")[0]]


def test_a_setting_that_a_saved_config_lacks_counts_as_its_default():
    """A checkpoint written before fne.keys existed ran momentum keys: it resumes under the default and is refused
    under online keys, named with the default it stands for."""
    current = to_dict(load_config(ROOT / "configs/demo.yaml"))
    saved = to_dict(load_config(ROOT / "configs/demo.yaml"))
    del saved["fne"]["keys"]
    assert differing_keys(saved, current) == []
    online = to_dict(load_config(ROOT / "configs/demo.yaml", ["fne.keys=online"]))
    assert differing_keys(saved, online) == ["fne.keys: 'momentum' -> 'online'"]


def test_settings_that_do_not_shape_the_state_may_change_on_resume():
    a = to_dict(load_config(ROOT / "configs/demo.yaml"))
    b = to_dict(load_config(ROOT / "configs/demo.yaml", ["fne.impl=dense", "train.epochs=20", "train.steps=9",
                                                         "train.log_every=1", "train.output_dir=elsewhere"]))
    assert differing_keys(a, b) == []


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  train: x.tar\n  batch_size: [8\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{path}:4:") and "YAML syntax error" in message


def test_overwrite_and_resume_from_the_same_folder_are_exclusive():
    with pytest.raises(ConfigError, match=r"train\.overwrite=true .* train\.resume=latest"):
        load_config(ROOT / "configs/demo.yaml", ["train.overwrite=true", "train.resume=latest"])


def test_a_null_deepspeed_section_is_left_out_for_deepspeed():
    """`deepspeed.scheduler=null` (a constant learning rate) reaches DeepSpeed as no scheduler, not as a None it
    cannot read."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from fne_dist.train import deepspeed_config

    cfg = load_config(ROOT / "configs/demo.yaml", ["deepspeed.scheduler=null"])
    ds = deepspeed_config(cfg, total_optimizer_steps=10)
    assert "scheduler" not in ds and ds["optimizer"] == cfg.deepspeed["optimizer"]
    assert DeepSpeedConfig(ds).scheduler_name is None
    with_schedule = deepspeed_config(load_config(ROOT / "configs/demo.yaml"), total_optimizer_steps=10)
    assert with_schedule["scheduler"]["params"]["total_num_steps"] == 10
