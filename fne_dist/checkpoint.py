"""Training checkpoints: the DeepSpeed engine's plus everything FNE adds, committed atomically.

Layout of `<output_dir>/checkpoints/`:
```
latest                      the tag of the newest complete checkpoint (replaced atomically, written last)
step000000200/              one tag per saved step
    fne_state.pt            rank 0: config, model architecture, world size, progress, momentum towers,
                            similarity statistics
    buffer_rank00000.pt     the negative buffer (keys, ids, labels, pointer, validity): every rank its shard
                            (fne.buffer=sharded), or rank 0 the whole queue (replicated)
    rng_rank00000.pt        every rank: its python / numpy / torch (/ cuda) generator states
    mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed: online towers, optimizer, scheduler
```
Every rank calls `save`.  Our files go into the tag folder first; DeepSpeed then writes its own with
`save_latest=False`, because DeepSpeed writes `latest` from rank 0 without waiting for the other ranks and not
atomically.  Only after a barrier that follows every rank's writes does rank 0 replace `latest` (temporary
file + rename), so a crash at any point leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fne_dist.config import differing_keys
from fne_dist.distributed import is_distributed, rank, world_size

LATEST = "latest"
STATE = "fne_state.pt"
DS_MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a run whose state does not fit this one."""


@dataclass
class Progress:
    """Where training stands: steps done, the epoch in progress and the batches of it already trained on."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


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


def save(engine, ckpt_dir: str | Path, *, progress: Progress, config: dict, architecture: dict,
         momentum: torch.nn.Module, objective) -> Path:
    """Write a checkpoint of this step (collective: every rank calls it) and move `latest` to it."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_name(progress.step)
    tag_dir = ckpt_dir / tag
    if rank() == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    if rank() == 0:
        torch.save({"config": config, "architecture": architecture, "world_size": world_size(),
                    "progress": asdict(progress), "momentum": momentum.state_dict(),
                    "stats": objective.stats.state_dict()},
                   tag_dir / STATE)
    if objective.buffer.sharded or rank() == 0:
        torch.save(objective.buffer.state_dict(), tag_dir / _buffer_file(objective))
    torch.save(rng_state(), tag_dir / _rng_file(rank()))
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)  # collective; ends with a barrier
    _barrier()
    if rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.partial"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
    _barrier()
    return tag_dir


def find(resume: str, ckpt_dir: str | Path) -> Path | None:
    """The tag folder that train.resume names: "latest" (the newest in ckpt_dir; it must exist), "auto" (the
    same, or None when there is none yet: a requeued job's first start) or a path (see `locate`)."""
    ckpt_dir = Path(ckpt_dir)
    if resume not in ("latest", "auto"):
        return locate(resume)
    if (ckpt_dir / LATEST).is_file():
        return ckpt_dir / (ckpt_dir / LATEST).read_text().strip()
    if resume == "auto":
        return None
    raise FileNotFoundError(f"resume=latest: no checkpoint in {ckpt_dir} (no '{LATEST}' file); use resume=auto to "
                            "start fresh when there is none, or give a checkpoint path")


def locate(path: str | Path) -> Path:
    """The tag folder of a path: a tag folder itself, a checkpoints folder (its latest) or a run's output_dir."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if (folder / LATEST).is_file():
            return folder / (folder / LATEST).read_text().strip()
    if (path / STATE).is_file():
        return path
    raise FileNotFoundError(f"{path} is not a checkpoint: no {STATE} in it and no '{LATEST}' file in it or in "
                            f"{path / 'checkpoints'}")


def read_state(tag_dir: str | Path) -> dict:
    path = Path(tag_dir) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint: {STATE} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_compatible(state: dict, *, config: dict, architecture: dict, tag_dir: Path) -> None:
    """Refuse, naming every differing setting, a checkpoint whose state cannot continue under this config."""
    diffs = differing_keys(state["config"], config)
    saved_arch, arch = _flatten(state["architecture"]), _flatten(architecture)
    diffs += [f"model architecture {k}: {saved_arch.get(k)!r} -> {arch.get(k)!r}"
              for k in sorted(saved_arch.keys() | arch.keys()) if saved_arch.get(k) != arch.get(k)]
    if state["world_size"] != world_size():
        diffs.append(f"world size: {state['world_size']} -> {world_size()}")
    if diffs:
        raise CheckpointMismatch(
            f"cannot resume from {tag_dir}: this run differs in " + "; ".join(diffs)
            + ". Resume with the checkpoint's settings (its config is stored in the checkpoint), "
              "or start a fresh run in another train.output_dir.")


def load(engine, tag_dir: str | Path, *, state: dict, momentum: torch.nn.Module, objective) -> Progress:
    """Restore a checkpoint that `check_compatible` accepted (collective: every rank calls it)."""
    tag_dir = Path(tag_dir)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine checkpoint in {tag_dir}")
    momentum.load_state_dict(state["momentum"])
    objective.buffer.load_state_dict(torch.load(tag_dir / _buffer_file(objective), weights_only=True))
    objective.stats.load_state_dict(state["stats"])
    set_rng_state(torch.load(tag_dir / _rng_file(rank()), weights_only=False))
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

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return torch.load(tag_dir / DS_MODEL_STATES, map_location="cpu", weights_only=False)["module"]
