"""`fne-train --config FILE [--resume latest|auto|PATH] [key=value ...]`: distributed FNE training with DeepSpeed.

One process per rank.  The process group comes from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which torchrun and the deepspeed launcher set, and which fne_dist.job derives from SLURM's variables
inside a submitit job or an srun step; a lone process without any of them runs as a world of one.  gloo on CPU,
NCCL on GPU.

`train(cfg)` is the entry point for code (fne-launch calls it inside a submitit job) and returns a summary dict;
`main` is the console script.  A stop request (SIGTERM / SIGUSR2 on any rank, agreed on by all ranks at a step
boundary) makes every rank save a checkpoint and return `{"preempted": True, "step": ...}`; `main` then exits
with EXIT_PREEMPTED so that a job script can tell "requeue me" from success and failure.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fne_dist import checkpoint
from fne_dist.checkpoint import Progress
from fne_dist.config import Config, check_world, epoch_pairs, load_config, to_dict, to_yaml
from fne_dist.data import load_eval_set, make_train_loader
from fne_dist.distributed import all_reduce, is_distributed, world_size
from fne_dist.evaluate import evaluate, format_metrics
from fne_dist.job import export_distributed_env
from fne_dist.metrics_log import MetricsLog
from fne_dist.model import (build_towers, clamp_logit_scale, encode, freeze_temperature, momentum_copy,
                            momentum_update, param_groups)
from fne_dist.objective import DIAGNOSTICS, SCALED_OBJECTIVES, Objective, summarise
from fne_dist.preemption import StopRequest

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again with --resume auto
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TALLY = ("loss", "steps", "bad_steps", *DIAGNOSTICS)  # bad steps are counted on every rank
log = logging.getLogger("fne_dist.train")


class Tally:
    """Sums of per-step values (TALLY) since the last `read`, which sums them over ranks (collective) and resets."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(TALLY), dtype=torch.float64, device=device)

    def add_step(self, loss: torch.Tensor, diagnostics: torch.Tensor) -> None:
        self.sums[0] += loss.detach().double()
        self.sums[1] += 1
        self.sums[3:] += diagnostics

    def add_bad_step(self) -> None:
        self.sums[2] += 1

    def read(self) -> dict:
        sums = dict(zip(TALLY, all_reduce(self.sums.clone()).tolist()))
        self.sums.zero_()
        out = {"loss": sums["loss"] / sums["steps"] if sums["steps"] else float("nan"),
               "bad_steps": round(sums["bad_steps"] / world_size())}
        return out | summarise(sums)


class BadStepsError(RuntimeError):
    """Too many consecutive steps with non-finite values."""


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process created the process group and destroys it at the end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Runtime:
    """Join (or, alone, create) the process group described by the environment."""
    import deepspeed  # here and in Trainer: importing DeepSpeed probes for accelerators, which launchers need not

    export_distributed_env()  # inside a submitit job or an srun step: from SLURM's variables
    present = [v for v in ENV_VARS if v in os.environ]
    if not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    elif len(present) < len(ENV_VARS):
        missing = [v for v in ENV_VARS if v not in os.environ]
        raise RuntimeError(f"{', '.join(present)} set but {', '.join(missing)} not: start the ranks with torchrun, "
                           "the deepspeed launcher or fne-launch, or set all of " + ", ".join(ENV_VARS))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not is_distributed()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def deepspeed_config(cfg: Config, total_optimizer_steps: int) -> dict:
    """The deepspeed section with what the run decides: the micro batch, and the cosine schedule's length."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; DeepSpeed's own step prints are noise
    scheduler = ds.get("scheduler") or {}
    if scheduler.get("type") == "WarmupCosineLR":
        scheduler.setdefault("params", {}).setdefault("total_num_steps", total_optimizer_steps)
    return ds


def compute_dtype(ds: dict) -> torch.dtype:
    if (ds.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def seed_everything(seed: int) -> None:
    """The same seed on every rank: the towers start identical (DeepSpeed also broadcasts rank 0's weights)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime):
        import deepspeed

        self.cfg, self.rt = cfg, rt
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.global_batch = check_world(cfg, rt.world_size)
        seed_everything(cfg.train.seed)
        self.towers = build_towers(cfg.model)
        model = self.towers.model
        if cfg.fne.objective not in SCALED_OBJECTIVES:
            freeze_temperature(model)
        self.momentum = momentum_copy(model).to(rt.device)
        self.batches_per_epoch = self._loader(0, 0).batches_per_epoch
        total = self.batches_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.steps or total)
        ds = deepspeed_config(cfg, max(1, self.total_steps // cfg.deepspeed.get("gradient_accumulation_steps", 1)))
        self.dtype = compute_dtype(ds)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.objective = Objective(cfg.fne, self.towers.architecture["embed_dim"], rt.device, cfg.train.seed)
        self.eval_set = None
        if cfg.data.val and cfg.train.eval_every:
            self.eval_set = load_eval_set(cfg.data.val, preprocess=self.towers.preprocess_val,
                                          tokenizer=self.towers.tokenizer)
        self.metrics = MetricsLog(self.out_dir, enabled=rt.rank == 0)
        self.stop = StopRequest(rt.device)
        self.window, self.epoch_tally = Tally(rt.device), Tally(rt.device)  # since the last log / in this epoch
        self.bad_in_a_row = 0
        self.last_saved = -1
        self.epoch_records: list[dict] = []
        self.data_skipped = 0  # bad shard members skipped by this rank in finished epochs

    def _loader(self, epoch: int, skip: int):
        cfg = self.cfg
        return make_train_loader(
            cfg.data.train, preprocess=self.towers.preprocess_train if cfg.data.augment else self.towers.preprocess_val,
            tokenizer=self.towers.tokenizer, batch_size=cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
            rank=self.rt.rank, world_size=self.rt.world_size, resampled=cfg.data.resampled,
            shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.workers,
            epoch_pairs=epoch_pairs(cfg, self.global_batch), skip_batches=skip)

    # ---- one step ---------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.dtype)

    def _all_ranks_finite(self, *tensors: torch.Tensor) -> bool:
        flag = torch.stack([t.isfinite().all() for t in tensors]).all().float().reshape(1)
        return bool(all_reduce(flag, op=dist.ReduceOp.MIN).item())

    def train_step(self, batch, step: int, warmup: bool) -> bool:
        """FNE_SPEC steps 1-10 for one batch; skipped on every rank (no update) if any rank sees a non-finite value.
        True if the optimizer stepped (with gradient accumulation, only at the end of an accumulation)."""
        device = self.rt.device
        images = batch.images.to(device, non_blocking=True)
        tokens, ids, labels = (t.to(device, non_blocking=True) for t in (batch.tokens, batch.ids, batch.labels))
        # EMA first: under ZeRO-3 it gathers and re-partitions the online weights, which must not happen
        # between the online forward and its backward.  Both read the same (not yet updated) weights.
        momentum_update(self.engine.module, self.momentum, self.cfg.fne.momentum, self.zero3)
        with torch.no_grad(), self._autocast():
            ik, tk, _ = encode(self.momentum, images, tokens)
        ia, ta, logit_scale = encode(self.engine, images.to(self.dtype), tokens)
        if not self._all_ranks_finite(ia, ta, ik, tk):
            self._bad_step(step)
            return False
        self.bad_in_a_row = 0
        out = self.objective.loss(ia, ta, ik, tk, ids, labels, step=step, rank=self.rt.rank, warmup=warmup,
                                  logit_scale=logit_scale)
        self.engine.backward(out.loss)
        optimizer_steps = self.engine.global_steps
        self.engine.step()
        if self.cfg.fne.objective in SCALED_OBJECTIVES:
            clamp_logit_scale(self.engine.module, self.zero3)
        self.objective.enqueue(out.keys)
        for tally in (self.window, self.epoch_tally):
            tally.add_step(out.loss, out.diagnostics)
        return self.engine.global_steps != optimizer_steps

    def _bad_step(self, step: int) -> None:
        self.bad_in_a_row += 1
        for tally in (self.window, self.epoch_tally):
            tally.add_bad_step()
        if self.rt.rank == 0:
            log.warning("step %d: non-finite features or keys on some rank; step skipped (%d in a row)",
                        step, self.bad_in_a_row)
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise BadStepsError(
                f"{self.bad_in_a_row} consecutive steps (up to step {step}) had non-finite features or keys, so "
                f"training stopped (train.max_bad_steps={self.cfg.train.max_bad_steps}). Lower the learning rate, "
                "enable gradient_clipping in the deepspeed section, or check the data; the last checkpoint "
                f"in {self.ckpt_dir} is from before the divergence")

    # ---- logging ----------------------------------------------------------------------------------------------
    def _log(self, progress: Progress, loader, seconds: float, steps: int, bar) -> None:
        """One training record (collective): means over the window and the ranks, the Gaussians, the lr."""
        record = self.window.read()
        skipped = all_reduce(torch.tensor([float(self.data_skipped + loader.skipped)], device=self.rt.device))
        record |= {"epoch": progress.epoch, "lr": float(self.engine.get_lr()[0]),
                   "samples_per_s": steps * self.global_batch / max(seconds, 1e-9), "data_skipped": int(skipped),
                   "warmup": progress.epoch < self.cfg.fne.warmup_epochs}
        stats = self.objective.stats
        if float(stats.count_pos) > 0:
            record |= dict(zip(("mean_pos", "var_pos", "mean_neg", "var_neg"), (float(t) for t in stats.moments())))
            record["count_pos"] = float(stats.count_pos)
        self.metrics.write(progress.step, "train", record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")

    # ---- epochs, checkpoints ----------------------------------------------------------------------------------
    def _end_epoch(self, progress: Progress, loader) -> None:
        """Statistics reset policy, evaluation, and this epoch's record (collective)."""
        self.objective.stats.new_epoch()
        self.data_skipped += loader.skipped
        record = {"epoch": progress.epoch, "step": progress.step,
                  "warmup": progress.epoch < self.cfg.fne.warmup_epochs, **self.epoch_tally.read()}
        every = self.cfg.train.eval_every
        if self.eval_set is not None and (progress.epoch + 1) % every == 0:
            record["eval"] = evaluate(self.engine, self.eval_set, self.rt.device, self.dtype)
            self.metrics.write(progress.step, "eval", {"epoch": progress.epoch, **record["eval"]})
            if self.rt.rank == 0:
                log.info("epoch %d: %s", progress.epoch, format_metrics(record["eval"]))
        self.epoch_records.append(record)

    def _save(self, progress: Progress) -> Path:
        path = checkpoint.save(self.engine, self.ckpt_dir, progress=progress, config=to_dict(self.cfg),
                               architecture=self.towers.architecture, momentum=self.momentum,
                               objective=self.objective)
        self.last_saved = progress.step
        return path

    def _checkpoint_or_stop(self, progress: Progress) -> bool:
        """After an optimizer step: save when a checkpoint is due; on a stop request (agreed by all ranks)
        save and return True."""
        every = self.cfg.train.checkpoint_every
        if every and progress.step // every > max(self.last_saved, 0) // every:
            self._save(progress)
        if not self.stop.should_stop():
            return False
        if self.stop.requested:
            log.warning("rank %d: stop requested (%s)", self.rt.rank, self.stop.signal_name)
        if self.last_saved != progress.step:
            self._save(progress)
        if self.rt.rank == 0:
            log.warning("stopping on request: every rank saved step %d in %s", progress.step, self.ckpt_dir)
        return True

    def _resume(self) -> Progress:
        if self.cfg.train.resume is None:
            return Progress()
        tag_dir = checkpoint.find(self.cfg.train.resume, self.ckpt_dir)
        if tag_dir is None:
            return Progress()
        state = checkpoint.read_state(tag_dir)
        checkpoint.check_compatible(state, config=to_dict(self.cfg), architecture=self.towers.architecture,
                                    tag_dir=tag_dir)
        progress = checkpoint.load(self.engine, tag_dir, state=state, momentum=self.momentum,
                                   objective=self.objective)
        self.last_saved = progress.step if tag_dir.parent.resolve() == self.ckpt_dir.resolve() else -1
        if self.rt.rank == 0:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", tag_dir, progress.step, progress.epoch,
                     progress.batch)
        return progress

    def _summary(self, progress: Progress, preempted: bool) -> dict:
        summary = {"preempted": preempted, "step": progress.step, "epoch": progress.epoch,
                   "checkpoint": str(self.ckpt_dir / checkpoint.tag_name(self.last_saved)),
                   "epochs": self.epoch_records,
                   "eval": next((r["eval"] for r in reversed(self.epoch_records) if "eval" in r), None)}
        if self.rt.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def run(self) -> dict:
        cfg = self.cfg
        progress = self._resume()
        self.stop.install()
        if self.rt.rank == 0:
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        bar = None
        if self.rt.rank == 0:
            bar = tqdm(total=self.total_steps, initial=progress.step, unit="step", dynamic_ncols=True)
        try:
            while progress.epoch < cfg.train.epochs and progress.step < self.total_steps:
                loader = self._loader(progress.epoch, progress.batch)
                warmup = progress.epoch < cfg.fne.warmup_epochs
                tick, ticks = time.perf_counter(), 0
                for batch in loader:
                    stepped = self.train_step(batch, progress.step, warmup)
                    progress.step += 1
                    progress.batch += 1
                    ticks += 1
                    if bar is not None:
                        bar.update(1)
                    if progress.step % cfg.train.log_every == 0:
                        self._log(progress, loader, time.perf_counter() - tick, ticks, bar)
                        tick, ticks = time.perf_counter(), 0
                    if stepped and self._checkpoint_or_stop(progress):
                        return self._summary(progress, preempted=True)
                    if progress.step >= self.total_steps:
                        break
                if progress.batch == loader.batches_per_epoch:
                    self._end_epoch(progress, loader)
                    progress.epoch += 1
                    progress.batch = 0
            if self.last_saved != progress.step:
                self._save(progress)
            return self._summary(progress, preempted=False)
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()


def train(cfg: Config) -> dict:
    """Train under this process's rank (see the module docstring); returns the run's summary."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    rt = init_distributed()
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not inside it
            summary = Trainer(cfg, rt).run()
        dist.barrier()
        return summary
    finally:
        if rt.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="fne-train", description="Distributed FNE training (see configs/).")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    parser.add_argument("--resume", help="latest | auto | a checkpoint folder (sets train.resume)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 fne.mode=bayes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    summary = train(load_config(args.config, overrides))
    return EXIT_PREEMPTED if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
