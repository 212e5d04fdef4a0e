"""Training checkpoints: the DeepSpeed engine's plus everything FNE adds, committed atomically.

Layout of `<output_dir>/checkpoints/`:
```
latest                      the tag of the newest complete checkpoint (replaced atomically, written last)
step000000200/              one tag per saved step
    fne_state.pt            rank 0: config, resolved settings, schedule length, model architecture, world size,
                            progress, momentum towers (ZeRO 0-2; None without them), similarity statistics
    momentum_rank00000.pt   ZeRO-3: every rank its fp32 partitions of the momentum towers (and their buffers);
                            none without momentum towers (fne.keys=online, or an objective that reads no keys)
    buffer_rank00000.pt     the negative buffer (keys, ids, labels, pointer, validity): every rank its shard
                            (fne.buffer=sharded), or rank 0 the whole queue (replicated); none for an objective
                            that reads no buffer (clip, vsepp, soft_clip hold none)
    rng_rank00000.pt        every rank: its python / numpy / torch (/ cuda) generator states
    mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed: online towers, optimizer, scheduler
```
Every rank calls `save`.  Our files go into the tag folder first, and the ranks agree (one all-reduce) that every
rank wrote its own: a write that failed on one rank then stops every rank at once, rather than leaving the others
in DeepSpeed's save barrier until the collective timeout (DeepSpeed's own writes are not covered: its save has
barriers of its own; the space check below guards them).  DeepSpeed then writes its own files with
`save_latest=False`, because DeepSpeed writes `latest` from rank 0 without waiting for the other ranks and not
atomically.  Only after a barrier that follows every rank's writes does rank 0 replace `latest` (temporary
file + rename), so a crash at any point leaves `latest` naming a complete checkpoint.

Before writing, every rank checks that the disk has room for another checkpoint as large as the last one; a write
that fails anyway (disk full) removes the partial tag folder and says so.  After `latest` moved, rank 0 deletes
the tags older than the newest `keep` ones, except the one `latest` names and any holding a file named `pinned`.

A resume compares what the saved state means, so `fne_state.pt` also holds `resolved` (the values the run's `auto`
and null settings took: buffer layout, queue dtype, prior ratio, ZeRO stage) and `schedule_steps` (the
learning-rate schedule's length, which DeepSpeed's scheduler state lacks: it keeps only the step count).
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fne_dist.config import STATE_SHAPING_KEYS, differing_keys, lookup
from fne_dist.distributed import any_rank, is_distributed, rank, rank_from_env, ranks_where, world_size
from fne_dist.momentum import is_zero3, load_partition_state, partition_state

LATEST = "latest"
STATE = "fne_state.pt"
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
PINNED = "pinned"  # a file of this name in a tag folder keeps it from retention
TAG = re.compile(r"step(\d{9})")
RUN_FILES = ("metrics.jsonl", "tensorboard", "summary.json", "config.yaml")  # what a run writes beside checkpoints/


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated or corrupt files."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint was written by a run whose state does not fit this one."""


class OutputDirError(ValueError):
    """train.output_dir cannot take this run: not writable, or holding another run's checkpoints."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, ...); the partial tag folder was removed."""

    rank_specific = True  # may happen on one rank only: that rank reports it

    def __str__(self) -> str:
        return self.strerror


class PeerWriteError(CheckpointWriteError):
    """Another rank failed to write its part of the checkpoint (its own error line says why); this one stopped too."""

    rank_specific = False  # every rank knows it: rank 0 says it


class NoRoomForCheckpoint(CheckpointWriteError):
    """The disk cannot take another checkpoint as large as the last one; nothing was written."""

    rank_specific = False  # every rank agreed on it


@dataclass
class Progress:
    """Where training stands: steps done, the epoch in progress and the batches of it already trained on, and the
    bad shard members all ranks skipped so far (in finished epochs and in this one's batches)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    data_skipped: int = 0


def tag_name(step: int) -> str:
    return f"step{step:09d}"


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(r: int) -> str:
    return f"rng_rank{r:05d}.pt"


def _buffer_file(objective) -> str:
    """The file of this rank's part of the buffer: its own shard, or (replicated) rank 0's whole queue."""
    return f"buffer_rank{rank() if objective.buffer.sharded else 0:05d}.pt"


def _momentum_file(r: int) -> str:
    return f"momentum_rank{r:05d}.pt"


def save(engine, ckpt_dir: str | Path, *, progress: Progress, config: dict, architecture: dict,
         momentum: torch.nn.Module | None, objective, batches_per_epoch: int | None = None,
         schedule_steps: int | None = None, metrics_bytes: int = 0, keep: int = 0) -> Path:
    """Write a checkpoint of this step (collective: every rank calls it), move `latest` to it, then keep the newest
    `keep` tags (0: all).  `schedule_steps`: the learning-rate schedule's length in optimizer steps (None: no
    schedule with a length); `metrics_bytes`: the length of metrics.jsonl now, which a resume truncates it to;
    `momentum`: the momentum towers, None where the run has none (nothing of them is written)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_name(progress.step)
    tag_dir = ckpt_dir / tag
    partitioned = momentum is not None and is_zero3(engine)  # then every rank saves its momentum partitions
    whole = None if partitioned or momentum is None else momentum.state_dict()  # rank 0 keeps them in STATE
    _check_space(ckpt_dir, tag_dir)
    error = None
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        if rank() == 0:
            torch.save({"config": config, "architecture": architecture, "world_size": world_size(),
                        "resolved": resolved_settings(engine, objective), "progress": asdict(progress),
                        "batches_per_epoch": batches_per_epoch, "schedule_steps": schedule_steps,
                        "metrics_bytes": metrics_bytes, "momentum": whole,
                        "stats": objective.stats.state_dict()},
                       tag_dir / STATE)
        if partitioned:
            torch.save(partition_state(momentum), tag_dir / _momentum_file(rank()))
        if objective.buffer is not None and (objective.buffer.sharded or rank() == 0):
            torch.save(objective.buffer.state_dict(), tag_dir / _buffer_file(objective))
        torch.save(rng_state(), tag_dir / _rng_file(rank()))
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as a RuntimeError
        error = err
    failed = ranks_where(error is not None)  # before DeepSpeed's save, which starts with a barrier
    if failed:
        raise _write_failed(error, ckpt_dir, tag_dir, failed) from error
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)  # collective; ends with a barrier
    except (OSError, RuntimeError) as err:
        raise _write_failed(err, ckpt_dir, tag_dir) from err
    _barrier()
    if rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.partial"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        if keep:
            prune(ckpt_dir, keep)
    _barrier()
    return tag_dir


def _latest(ckpt_dir: Path) -> Path | None:
    """The tag folder that ckpt_dir's `latest` file names, None without one."""
    return ckpt_dir / (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _check_space(ckpt_dir: Path, tag_dir: Path) -> None:
    """Refuse (on every rank alike) to start a checkpoint that the disk has no room for: the last one's size."""
    last = _latest(ckpt_dir)
    needed = _size(last) if last is not None and last.is_dir() and last != tag_dir else 0
    free = _free_bytes(ckpt_dir)
    if any_rank(free < needed):
        last_name = last.name if last is not None else "the previous checkpoint"
        raise NoRoomForCheckpoint(
            errno.ENOSPC, f"no space left for checkpoint {tag_dir}: the last one ({last_name}) took "
            f"{needed / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free in {ckpt_dir} (on this or another rank). "
            f"Nothing was written; `latest` still names {last_name}. Free space there (train.keep_checkpoints "
            "bounds how many checkpoints stay) and resume with --resume latest")


def _write_failed(err: BaseException | None, ckpt_dir: Path, tag_dir: Path,
                  failed: list[int] | None = None) -> CheckpointWriteError:
    """Remove the partial tag folder (unless `latest` names it) and say what happened: `err` on this rank, or (None)
    the failure of the ranks `failed`, which they say themselves."""
    last = _latest(ckpt_dir)
    if last is None or last.resolve() != tag_dir.resolve():
        shutil.rmtree(tag_dir, ignore_errors=True)
    previous = f"`latest` still names {last.name}" if last is not None else "there is no earlier checkpoint"
    if err is None:
        return PeerWriteError(
            errno.EIO, f"writing checkpoint {tag_dir} failed on rank {', '.join(map(str, failed))} (its error line "
            f"says why), so every rank stopped. The partial folder was removed and {previous}; fix the cause and "
            "resume with --resume latest")
    disk_full = getattr(err, "errno", None) == errno.ENOSPC or _free_bytes(ckpt_dir) < 2**20
    what = "no space left on device" if disk_full else f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return CheckpointWriteError(
        errno.ENOSPC if disk_full else errno.EIO,
        f"rank {rank()}: writing checkpoint {tag_dir} failed: {what}. The partial folder was removed and {previous}; "
        f"free space in {ckpt_dir} (train.keep_checkpoints bounds how many checkpoints stay) and resume with "
        "--resume latest")


def tag_step(path: Path) -> int | None:
    """The step of a tag folder's name (step000000200 -> 200), None for other names."""
    match = TAG.fullmatch(path.name)
    return int(match.group(1)) if match else None


def prune(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete tags older than the newest `keep` up to the one `latest` names, except pinned ones; returns them.

    Tags newer than `latest` (left by a crash before a resume from an older checkpoint) are not touched: the run
    writes them again when it gets there.  A tag is renamed before it is deleted, so a crash never leaves a
    half-deleted folder under a tag's name.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = _latest(ckpt_dir)
    if latest is None:
        return []
    newest = tag_step(latest)
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and tag_step(p) is not None
                   and tag_step(p) <= newest), key=tag_step)
    deleted = []
    for old in tags[:-keep]:
        if old.name == latest.name or (old / PINNED).exists():
            continue
        trash = old.with_name(f".deleting-{old.name}")
        os.replace(old, trash)
        shutil.rmtree(trash)
        deleted.append(old)
    return deleted


def prepare_output_dir(out_dir: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Before anything is built (every rank): the folder is writable, and a fresh run does not write over an
    earlier run's checkpoints unless told to (`overwrite`: rank 0 deletes them, its metrics and summary)."""
    out_dir = Path(out_dir)
    probe = out_dir / f".write-test-rank{rank_from_env():05d}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"train.output_dir={out_dir} is not writable ({err.strerror}): choose a folder this "
                             "job can write, e.g. train.output_dir=runs/NAME") from None
    ckpt_dir = out_dir / "checkpoints"
    if resume in ("latest", "auto") or (overwrite and rank_from_env() != 0):
        return
    held = ckpt_dir.is_dir() and any(p.name == LATEST or tag_step(p) is not None for p in ckpt_dir.iterdir())
    if not held or (resume is not None and _inside(locate(resume), ckpt_dir)):
        return
    if not overwrite:
        raise OutputDirError(
            f"train.output_dir={out_dir} holds the checkpoints of an earlier run ({ckpt_dir}): continue it with "
            "--resume latest, start fresh elsewhere with train.output_dir=OTHER, or delete them with --overwrite")
    if rank_from_env() == 0:
        shutil.rmtree(ckpt_dir)
        for name in RUN_FILES:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def find(resume: str, ckpt_dir: str | Path) -> Path | None:
    """The tag folder that train.resume names: "latest" (the newest in ckpt_dir; it must exist), "auto" (the
    same, or None when there is none yet: a requeued job's first start) or a path (see `locate`)."""
    ckpt_dir = Path(ckpt_dir)
    if resume not in ("latest", "auto"):
        return locate(resume)
    latest = _latest(ckpt_dir)
    if latest is not None or resume == "auto":
        return latest
    raise FileNotFoundError(f"resume=latest: no checkpoint in {ckpt_dir} (no '{LATEST}' file); use resume=auto to "
                            "start fresh when there is none, or give a checkpoint path")


def locate(path: str | Path) -> Path:
    """The tag folder of a path: a tag folder itself, a checkpoints folder (its latest) or a run's output_dir."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        latest = _latest(folder)
        if latest is not None:
            return latest
    if (path / STATE).is_file():
        return path
    raise FileNotFoundError(f"{path} is not a checkpoint: no {STATE} in it and no '{LATEST}' file in it or in "
                            f"{path / 'checkpoints'}")


def read_state(tag_dir: str | Path) -> dict:
    path = Path(tag_dir) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint: {STATE} is missing")
    return load_file(path, weights_only=True)


def load_file(path: Path, weights_only: bool) -> dict:
    """torch.load of one checkpoint file; an empty, truncated or corrupt file is an error that names it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch reports a damaged file as RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(f"{path} is empty, truncated or corrupt ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'}): this checkpoint was not "
                              "completely written; use another one (an older tag in the same checkpoints folder)") \
            from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


# Keys of `model.tower_architecture` that say where this machine keeps the text trunk (a folder in this venv's
# site-packages for the shipped MiniLM), not what the model is: a resume compares the config's
# model.text_tower.weights instead, so a run resumes or evaluates from another clone or venv.  (Here rather than in
# fne_dist.model, so that importing the checkpoint code does not import open_clip.)
LOCAL_PATH_KEYS = ("text_cfg.hf_model_name", "text_cfg.hf_tokenizer_name")


def architecture_diffs(saved: dict, current: dict) -> list[str]:
    """What differs between two model architectures, leaving out where each machine found its trunk files."""
    saved, current = _flatten(saved), _flatten(current)
    return [f"model architecture {k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in sorted((saved.keys() | current.keys()) - set(LOCAL_PATH_KEYS)) if saved.get(k) != current.get(k)]


def check_architecture(state: dict, architecture: dict, tag_dir: Path) -> None:
    """Refuse to load a checkpoint's towers into another architecture (fne-eval), naming what differs."""
    diffs = architecture_diffs(state["architecture"], architecture)
    if diffs:
        raise CheckpointMismatch(f"the towers in {tag_dir} do not fit this model config: " + "; ".join(diffs)
                                 + ". Leave --config out to use the checkpoint's own config, or pass the one it "
                                   "was trained with.")


def resolved_settings(engine, objective) -> dict:
    """The values that settings a config may leave to `auto` or null took in this run: what its state means.  A
    resume compares these, not the raw values (`fne.buffer=auto` is `sharded` on two ranks, a bf16 ring is not a
    float32 one although both configs say `fne.queue_dtype=auto`)."""
    resolved = {"fne.prior_ratio": objective.cfg.resolved_prior_ratio(),
                "deepspeed.zero_optimization.stage": engine.zero_optimization_stage()}
    if objective.buffer is not None:  # an objective without a buffer leaves its layout and dtype unresolved
        resolved.update({"fne.buffer": objective.buffer.layout,
                         "fne.queue_dtype": str(objective.buffer.dtype).split(".")[-1]})
    return resolved


def _resolved_diffs(state: dict, config: dict, resolved: dict) -> list[str]:
    """What differs among the settings both runs resolved, with the raw value beside each resolved one that it is
    not; the other settings are compared raw (so are all in checkpoints that predate `resolved`)."""
    saved_config, saved = state["config"], state.get("resolved", {})
    both = [k for k in STATE_SHAPING_KEYS if k in saved and k in resolved]

    def shown(raw, value) -> str:
        return repr(value) if raw == value else f"{raw!r} (= {value!r})"

    return differing_keys(saved_config, config, [k for k in STATE_SHAPING_KEYS if k not in both]) + [
        f"{k}: {shown(lookup(saved_config, k), saved[k])} -> {shown(lookup(config, k), resolved[k])}"
        for k in both if saved[k] != resolved[k]]


def check_compatible(state: dict, *, config: dict, architecture: dict, tag_dir: Path, resolved: dict,
                     batches_per_epoch: int | None = None, schedule_steps: int | None = None) -> None:
    """Refuse, naming every differing setting, a checkpoint whose state cannot continue under this config.
    `resolved`: this run's `resolved_settings`; `schedule_steps`: its learning-rate schedule's length (see `save`)."""
    diffs = _resolved_diffs(state, config, resolved) + architecture_diffs(state["architecture"], architecture)
    if state["world_size"] != world_size():
        diffs.append(f"world size: {state['world_size']} -> {world_size()}")
    saved_epoch = state.get("batches_per_epoch")
    if None not in (saved_epoch, batches_per_epoch) and saved_epoch != batches_per_epoch:
        diffs.append(f"batches per epoch (from the shards' manifest): {saved_epoch} -> {batches_per_epoch}")
    saved_schedule = state.get("schedule_steps")
    if None not in (saved_schedule, schedule_steps) and saved_schedule != schedule_steps:
        diffs.append(
            f"the learning-rate schedule's length: {saved_schedule} -> {schedule_steps} optimizer steps (set by "
            "train.epochs and train.steps unless deepspeed.scheduler.params.total_num_steps is; DeepSpeed keeps only "
            "the step count, so the curve would be reshaped and jump): keep train.epochs and train.steps, or keep "
            "the saved curve whatever the run's length with "
            f"deepspeed.scheduler.params.total_num_steps={saved_schedule}")
    if diffs:
        raise CheckpointMismatch(
            f"cannot resume from {tag_dir}: this run differs in " + "; ".join(diffs)
            + ". Resume with the checkpoint's settings (its config is stored in the checkpoint; where an auto or "
              "null setting took another value, '(= value)', set it to the checkpoint's), or start a fresh run in "
              "another train.output_dir.")


def load(engine, tag_dir: str | Path, *, state: dict, momentum: torch.nn.Module | None, objective) -> Progress:
    """Restore a checkpoint that `check_compatible` accepted (collective: every rank calls it); momentum None: the
    run has no momentum towers (fne.keys=online or an objective without keys, which `check_compatible` requires of
    the checkpoint too)."""
    tag_dir = Path(tag_dir)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine checkpoint in {tag_dir}")
    if momentum is not None and is_zero3(engine):
        partitions = tag_dir / _momentum_file(rank())
        load_partition_state(momentum, load_file(partitions, weights_only=True), str(partitions))
    elif momentum is not None:
        momentum.load_state_dict(state["momentum"])
    if objective.buffer is not None:
        objective.buffer.load_state_dict(load_file(tag_dir / _buffer_file(objective), weights_only=True))
    objective.stats.load_state_dict(state["stats"])
    set_rng_state(load_file(tag_dir / _rng_file(rank()), weights_only=False))
    return Progress(**state["progress"])


def online_state_dict(tag_dir: str | Path) -> dict:
    """The online towers' weights from a DeepSpeed checkpoint, without an engine (for evaluation).

    ZeRO 0-2 keep the whole module (in the training dtype) in the model-states file; ZeRO-3 partitions it,
    and DeepSpeed's zero_to_fp32 reassembles it from the fp32 optimizer partitions.
    """
    tag_dir = Path(tag_dir)
    stage = (read_state(tag_dir)["config"]["deepspeed"].get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"the ZeRO-3 partitions in {tag_dir} cannot be read ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0]}): this checkpoint was not completely written; use "
                                  "another one") from None
    path = tag_dir / DS_MODEL_STATES
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint: {DS_MODEL_STATES} is missing")
    return load_file(path, weights_only=False)["module"]
