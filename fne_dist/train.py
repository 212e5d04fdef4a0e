"""`fne-train --config FILE [--resume latest|auto|PATH] [key=value ...]`: distributed FNE training with DeepSpeed.

One process per rank.  The process group comes from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), which torchrun and the deepspeed launcher set, and which fne_dist.distributed derives from SLURM's
variables inside a submitit job or an srun step; a lone process without any of them runs as a world of one.  gloo
on CPU, NCCL on GPU.

`train(cfg)` is the entry point for code (fne-launch calls it inside a submitit job) and returns a summary dict;
`main` is the console script.  A stop request (SIGTERM / SIGUSR2 on any rank, agreed on by all ranks at a step
boundary) makes every rank save a checkpoint and return `{"preempted": True, "step": ...}`; `main` then exits
with EXIT_PREEMPTED on every rank so that a job script can tell "requeue me" from success and failure (srun and the
deepspeed launcher pass 75 on; torchrun exits 1 for any non-zero worker status and lists `exitcode : 75` per rank,
so under torchrun read `"preempted"` in <output_dir>/summary.json, which a run deletes when it starts).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fne_dist import checkpoint
from fne_dist.checkpoint import Progress
from fne_dist.cli import ArgumentParser, quiet_libraries
from fne_dist.cli import run as run_cli
from fne_dist.config import Config, check_world, epoch_pairs, load_config, lookup, to_dict, to_yaml
from fne_dist.data.loader import epoch_batches, expand_urls, load_eval_set, make_train_loader
from fne_dist.distributed import Runtime, all_reduce, env_world_size, init_distributed, rank_from_env, world_size
from fne_dist.evaluate import evaluate, format_metrics
from fne_dist.metrics_log import MetricsLog
from fne_dist.model import architecture, build_towers, clamp_logit_scale, encode, freeze_temperature, param_groups
from fne_dist.momentum import TrunkTap, is_zero3, momentum_copy, momentum_update, shard_momentum
from fne_dist.objective import Objective, momentum_keys, sizing_advice, unused_settings
from fne_dist.objectives import objective_class
from fne_dist.objectives.diagnostics import DIAGNOSTICS, summarise
from fne_dist.preemption import StopRequest

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint saved; run again with --resume auto
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


def deepspeed_config(cfg: Config, total_optimizer_steps: int) -> dict:
    """The deepspeed section with what the run decides: the micro batch, and the cosine schedule's length.  A
    section set to null (`deepspeed.scheduler=null`: a constant learning rate) is left out, as DeepSpeed expects."""
    ds = {key: value for key, value in copy.deepcopy(cfg.deepspeed).items() if value is not None}
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
    """Seed python, numpy and torch: with the run's seed on every rank while the towers are built (they start
    identical), then with seed + rank (as open_clip does), so that dropout, drop-path and augmentations differ
    across ranks.  A resume restores every rank's generators from the checkpoint."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_run(cfg: Config, world_size: int) -> int:
    """What a run on `world_size` ranks can be refused for before anything is built, read from the config, the shard
    lists and the manifest (no shard is opened) and the checkpoint folder: the config against the world
    (`check_world`), the model name, the shards against ranks x workers and the global batch, the eval shards, the
    checkpoint to resume.  Every rank finds the same, so each raises the same user error (rank 0 says it).  Returns
    each rank's batches per epoch."""
    global_batch = check_world(cfg, world_size)
    architecture(cfg.model)
    if cfg.data.val and cfg.train.eval_every:
        expand_urls(cfg.data.val)
    if cfg.train.resume is not None:
        checkpoint.find(cfg.train.resume, Path(cfg.train.output_dir) / "checkpoints")
    return epoch_batches(expand_urls(cfg.data.train), batch_size=cfg.data.batch_size, world_size=world_size,
                         num_workers=cfg.data.workers, resampled=cfg.data.resampled,
                         epoch_pairs=epoch_pairs(cfg, global_batch))


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, batches_per_epoch: int | None = None):
        """batches_per_epoch: each rank's batches per epoch as `check_run` gives it (None: checked and counted
        here, before anything is built); `fne-bench step` gives its own and drives `train_step` with its own
        batches, never opening the data."""
        import deepspeed

        self.cfg, self.rt = cfg, rt
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.global_batch = check_world(cfg, rt.world_size)
        self.batches_per_epoch = batches_per_epoch or check_run(cfg, rt.world_size)
        seed_everything(cfg.train.seed)
        self.towers = build_towers(cfg.model)
        model = self.towers.model
        if not objective_class(cfg.fne.objective).scaled:
            freeze_temperature(model)
        # momentum towers only where the step takes momentum keys; before deepspeed.initialize partitions `model`
        self.momentum = momentum_copy(model).to(rt.device) if momentum_keys(cfg.fne) else None
        total = self.batches_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.steps or total)
        ds = deepspeed_config(cfg, max(1, self.total_steps // cfg.deepspeed.get("gradient_accumulation_steps", 1)))
        self.schedule_steps = lookup(ds, "scheduler.params.total_num_steps")  # a resume must not reshape it
        self.dtype = compute_dtype(ds)
        warmup_steps = ((ds.get("scheduler") or {}).get("params") or {}).get("warmup_num_steps", 0)
        if rt.rank == 0 and warmup_steps > self.total_steps:
            log.warning("deepspeed.scheduler.params.warmup_num_steps=%d is longer than the run's %d steps: the "
                        "learning rate never reaches its peak; set deepspeed.scheduler.params.warmup_num_steps=%d",
                        warmup_steps, self.total_steps, max(1, self.total_steps // 10))
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
        self.zero3 = is_zero3(self.engine)
        if self.zero3 and self.momentum is not None:  # partitioned like the online ones; gathered module by module
            self.momentum = shard_momentum(self.momentum, ds["zero_optimization"])
        seed_everything(cfg.train.seed + rt.rank)
        self.objective = Objective(cfg.fne, self.towers.architecture["embed_dim"], rt.device, cfg.train.seed)
        if rt.rank == 0:
            for line in unused_settings(cfg.fne):
                log.info(line)
            for advice in sizing_advice(cfg.fne, epoch_pairs=self.batches_per_epoch * self.global_batch,
                                        global_batch=self.global_batch, total_steps=self.total_steps):
                log.warning(advice)
        towers = (cfg.model.image_tower, cfg.model.text_tower)
        frozen = self.momentum is not None and all(t is not None and t.freeze for t in towers)
        self.trunk_tap = TrunkTap(self.engine.module) if frozen else None
        self.eval_set = None
        if cfg.data.val and cfg.train.eval_every:
            self.eval_set = load_eval_set(cfg.data.val, preprocess=self.towers.preprocess_val,
                                          tokenizer=self.towers.tokenizer, timeout=cfg.data.timeout,
                                          retries=cfg.data.retries, min_rate=cfg.data.min_rate)
        self.metrics = MetricsLog(self.out_dir, enabled=rt.rank == 0)
        self.stop = StopRequest()
        self.stop_agreed = False  # some rank was asked to stop, as all ranks agreed in the last step
        self.ema_due = True  # an optimizer step (or the start, or a resume after one) awaits its EMA
        self.window, self.epoch_tally = Tally(rt.device), Tally(rt.device)  # since the last log / in this epoch
        self.bad_in_a_row = 0
        self.last_saved = -1
        self.epoch_records: list[dict] = []
        self.data_skipped = 0  # bad shard members skipped by this rank in finished epochs (rank 0: + before a resume)
        self.loader = None  # of the epoch in progress

    def _loader(self, epoch: int, skip: int):
        cfg = self.cfg
        return make_train_loader(
            cfg.data.train, preprocess=self.towers.preprocess_train if cfg.data.augment else self.towers.preprocess_val,
            tokenizer=self.towers.tokenizer, batch_size=cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch,
            rank=self.rt.rank, world_size=self.rt.world_size, resampled=cfg.data.resampled,
            shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.workers,
            epoch_pairs=epoch_pairs(cfg, self.global_batch), skip_batches=skip, timeout=cfg.data.timeout,
            retries=cfg.data.retries, min_rate=cfg.data.min_rate)

    # ---- one step ---------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.dtype)

    def train_step(self, batch, step: int, warmup: bool, epoch: int | None = None) -> bool:
        """FNE_SPEC steps 1-10 for one batch; True if the optimizer stepped (with gradient accumulation, only at the
        end of an accumulation).  epoch: for objectives that switch a term on at an epoch (Objective.loss).  Order,
        so that a non-finite step touches nothing on any rank:
          0. the EMA of the momentum towers for the last optimizer step, once per optimizer step, before this step's
             keys (FNE_SPEC's order; at the first step of a run it moves nothing).  It belongs to the last finished
             step, not to this one: a checkpoint saved after that step holds the momentum towers before it, and a
             resume runs it first.  Under ZeRO-3 every rank updates its own partitions (no collective).  With
             fne.keys=online, or an objective that reads no keys, there are no momentum towers and no EMA;
          1. keys from the momentum towers (or without them the online features detached), features from the
             online towers, the loss (`Objective.loss` changes no state: it returns the step's keys and statistics);
          2. one all-reduce and one host sync: are the loss (which every feature and key enters) and the keys
             finite on every rank, and was a stop asked for anywhere (kept for `_checkpoint_or_stop`);
          3. a bad step ends here; else backward, the optimizer step (which makes the next EMA due), the statistics
             and the enqueue.
        """
        if self.ema_due and self.momentum is not None:
            momentum_update(self.engine.module, self.momentum, self.cfg.fne.momentum, self.zero3)
            self.ema_due = False
        out = self.forward_loss(batch, step, warmup, epoch)
        bad, self.stop_agreed = self.stop.agree(~_finite(out.loss, out.keys.image, out.keys.text))
        if bad:
            self._bad_step(step)
            return False
        self.bad_in_a_row = 0
        return self.apply(out)

    def forward_loss(self, batch, step: int, warmup: bool, epoch: int | None = None):
        """Step 1 of `train_step`: the step's loss, keys and statistics, nothing changed yet."""
        device = self.rt.device
        images = batch.images.to(device, non_blocking=True)
        tokens, ids, labels = (t.to(device, non_blocking=True) for t in (batch.tokens, batch.ids, batch.labels))
        ik = tk = None  # no momentum towers: Objective.loss takes the online features, detached
        if self.momentum is not None and self.trunk_tap is None:
            with torch.no_grad(), self._autocast():
                ik, tk, _ = encode(self.momentum, images, tokens)
        ia, ta, logit_scale = encode(self.engine, images.to(self.dtype), tokens)
        if self.trunk_tap is not None:  # frozen trunks: the momentum heads on what the online trunks just computed
            with torch.no_grad(), self._autocast():
                ik, tk = self.trunk_tap.momentum_keys(self.momentum)
        return self.objective.loss(ia, ta, ik, tk, ids, labels, step=step, rank=self.rt.rank, warmup=warmup,
                                   logit_scale=logit_scale, epoch=epoch)

    def apply(self, out) -> bool:
        """Step 3 of `train_step`, for a step found finite on every rank."""
        self.engine.backward(out.loss)
        optimizer_steps = self.engine.global_steps
        self.engine.step()
        stepped = self.engine.global_steps != optimizer_steps
        if stepped and self.objective.scaled:  # the weights moved: clamp every copy
            clamp_logit_scale(self.engine.module, self.zero3)
        self.ema_due |= stepped
        self.objective.commit(out)
        for tally in (self.window, self.epoch_tally):
            tally.add_step(out.loss, out.diagnostics)
        return stepped

    def _bad_step(self, step: int) -> None:
        self.bad_in_a_row += 1
        for tally in (self.window, self.epoch_tally):
            tally.add_bad_step()
        if self.rt.rank == 0:
            log.warning("step %d: non-finite loss or keys on some rank; step skipped (%d in a row)",
                        step, self.bad_in_a_row)
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise BadStepsError(
                f"{self.bad_in_a_row} consecutive steps (up to step {step}) had a non-finite loss or keys, so "
                f"training stopped (train.max_bad_steps={self.cfg.train.max_bad_steps}). Lower the learning rate, "
                "enable gradient_clipping in the deepspeed section, or check the data; the last checkpoint "
                f"in {self.ckpt_dir} is from before the divergence")

    # ---- logging ----------------------------------------------------------------------------------------------
    def _log(self, progress: Progress, loader, seconds: float, steps: int, bar) -> None:
        """One training record (collective): means over the window and the ranks, the Gaussians, the lr."""
        record = self.window.read()
        skipped = self._data_skipped()
        record |= {"epoch": progress.epoch, "lr": float(self.engine.get_lr()[0]),
                   "samples_per_s": steps * self.global_batch / max(seconds, 1e-9), "data_skipped": int(skipped),
                   "warmup": self._warming(progress.epoch)}
        stats = self.objective.stats
        if float(stats.count_pos) > 0:
            record |= dict(zip(("mean_pos", "var_pos", "mean_neg", "var_neg"), (float(t) for t in stats.moments())))
            record["count_pos"] = float(stats.count_pos)
        self.metrics.write(progress.step, "train", record)
        for news in self.objective.news():
            if self.rt.rank == 0:
                log.info("step %d: %s", progress.step, news)
        if bar is not None and bar.disable:  # no bar (not a terminal): a log line instead
            log.info("step %d/%d: loss %.4f, %.1f samples/s", progress.step, self.total_steps, record["loss"],
                     record["samples_per_s"])
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")

    def _warming(self, epoch: int) -> bool:
        """The epoch runs the objective's warm-up (only objectives that have one warm up)."""
        return epoch < self.cfg.fne.warmup_epochs and self.objective.warmup_objective is not None

    # ---- epochs, checkpoints ----------------------------------------------------------------------------------
    def _data_skipped(self) -> int:
        """Bad shard members all ranks skipped so far (collective)."""
        mine = self.data_skipped + (self.loader.skipped if self.loader is not None else 0)
        return int(all_reduce(torch.tensor([float(mine)], device=self.rt.device)).item())

    def _end_epoch(self, progress: Progress, loader) -> None:
        """Statistics reset policy, evaluation, and this epoch's record (collective)."""
        off = None if self._warming(progress.epoch) else self.objective.posterior_off()
        if off and self.rt.rank == 0:
            log.warning("epoch %d: %s", progress.epoch, off)
        self.objective.stats.new_epoch()
        self.data_skipped += loader.skipped
        self.loader = None
        record = {"epoch": progress.epoch, "step": progress.step,
                  "warmup": self._warming(progress.epoch), **self.epoch_tally.read()}
        every = self.cfg.train.eval_every
        if self.eval_set is not None and (progress.epoch + 1) % every == 0:
            record["eval"] = evaluate(self.engine, self.eval_set, self.rt.device, self.dtype)
            self.metrics.write(progress.step, "eval", {"epoch": progress.epoch, **record["eval"]})
            if self.rt.rank == 0:
                log.info("epoch %d: %s", progress.epoch, format_metrics(record["eval"]))
        self.epoch_records.append(record)

    def _save(self, progress: Progress) -> Path:
        progress.data_skipped = self._data_skipped()
        path = checkpoint.save(self.engine, self.ckpt_dir, progress=progress, config=to_dict(self.cfg),
                               architecture=self.towers.architecture, momentum=self.momentum,
                               objective=self.objective, batches_per_epoch=self.batches_per_epoch,
                               schedule_steps=self.schedule_steps, metrics_bytes=self.metrics.size(),
                               keep=self.cfg.train.keep_checkpoints)
        self.last_saved = progress.step
        return path

    def _checkpoint_or_stop(self, progress: Progress) -> bool:
        """After an optimizer step: save when a checkpoint is due; on a stop request (agreed by all ranks)
        save and return True."""
        every = self.cfg.train.checkpoint_every
        if every and progress.step // every > max(self.last_saved, 0) // every:
            self._save(progress)
        if not self.stop_agreed:
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
                                    tag_dir=tag_dir, resolved=checkpoint.resolved_settings(self.engine, self.objective),
                                    batches_per_epoch=self.batches_per_epoch, schedule_steps=self.schedule_steps)
        progress = checkpoint.load(self.engine, tag_dir, state=state, momentum=self.momentum,
                                   objective=self.objective)
        if self.rt.rank == 0:
            self.data_skipped = progress.data_skipped  # the sum over ranks counts it once
        if tag_dir.parent.resolve() == self.ckpt_dir.resolve():  # this run's own: drop what it logged after it
            self.last_saved = progress.step
            self.metrics.rewind(state.get("metrics_bytes"), progress.step)
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
            (self.out_dir / "summary.json").unlink(missing_ok=True)  # a crash must not leave an earlier verdict
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        bar = None
        if self.rt.rank == 0:
            # a bar on a terminal only (disable=None): in a SLURM log its redraws would pile up; the log lines remain
            bar = tqdm(total=self.total_steps, initial=progress.step, unit="step", dynamic_ncols=True, disable=None)
        try:
            while progress.epoch < cfg.train.epochs and progress.step < self.total_steps:
                self.loader = loader = self._loader(progress.epoch, progress.batch)
                warmup = progress.epoch < cfg.fne.warmup_epochs
                tick, ticks = time.perf_counter(), 0
                for batch in loader:
                    stepped = self.train_step(batch, progress.step, warmup, progress.epoch)
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
            self.stop.restore()
            if bar is not None:
                bar.close()
            self.metrics.close()


def _finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-dim bool on the device: every value of every tensor is finite (no host sync)."""
    return torch.stack([t.isfinite().all() for t in tensors]).all()


def train(cfg: Config) -> dict:
    """Train under this process's rank (see the module docstring); returns the run's summary."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    quiet_libraries()  # here too for fne-launch's jobs, which call train() without the console script
    checkpoint.prepare_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite)
    batches_per_epoch = check_run(cfg, env_world_size())
    if rank_from_env() == 0:
        log.info("training into %s: building the towers, reading the data, starting DeepSpeed", cfg.train.output_dir)
    rt = init_distributed()
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not inside it
            summary = Trainer(cfg, rt, batches_per_epoch).run()
        dist.barrier()
        return summary
    finally:
        if rt.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="fne-train", description="Distributed FNE training (see configs/).")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    parser.add_argument("--resume", help="latest | auto | a checkpoint folder (sets train.resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start fresh in an output_dir that holds an earlier run's checkpoints, deleting them "
                             "and its metrics (sets train.overwrite)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 fne.mode=bayes")
    return parser.parse_intermixed_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    overrides += ["train.overwrite=true"] if args.overwrite else []
    summary = train(load_config(args.config, overrides))
    return EXIT_PREEMPTED if summary["preempted"] else 0


def main(argv: list[str] | None = None) -> int:
    """The console script: bad input is one `fne-train: error:` line (rank 0) and exit status 2.  After a stop
    request every rank has saved and passed a last barrier; each then leaves at once with EXIT_PREEMPTED, so that
    launchers which stop the other ranks when one exits (torchrun, srun --kill-on-bad-exit, the deepspeed
    launcher) see 75 from every rank rather than a rank they killed in its interpreter shutdown."""
    status = run_cli("fne-train", _main, argv)
    if status == EXIT_PREEMPTED:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
