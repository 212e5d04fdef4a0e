"""Every user error fne-train can meet, through the console script itself, on every rank of an srun-style launch
(the ranks started with torch's environment variables, as srun, submitit and fne-launch start them): exit status 2
on every rank, one `fne-train: error:` line on rank 0's stderr that names the problem and the fix, nothing from the
other rank, no traceback.  The checks run before the towers, the process group and DeepSpeed exist, so nothing but
the error line is printed.  fne-eval's, likewise before the work they would waste."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from fne_dist import checkpoint
from fne_dist import evaluate as fne_eval
from fne_dist.cli import USER_ERRORS
from fne_dist.config import load_config
from fne_dist.data.digits import render
from fne_dist.distributed import ENV_VARS, free_port
from fne_dist.model import build_towers
from fne_dist.data.shards import (MANIFEST, DataError, ShardSample, count_pairs, make_manifest, shard_name, write_manifest,
                             write_shard)
from test_cli import DEMO, error_lines, fake_checkpoint
from test_pretrained import tower_config

TIMEOUT = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shard folders: `listed`, 4 shards of 4 one-caption pairs in a manifest (nothing reads the images), and
    `unlisted`, the same shards without one."""
    root = tmp_path_factory.mktemp("shards")
    for folder in ("listed", "unlisted"):
        (root / folder).mkdir()
        infos = [write_shard(root / folder / shard_name("train", s),
                             [ShardSample(f"{s}{k}", b"never read", "png", ["a caption"], image_id=4 * s + k)
                              for k in range(4)])
                 for s in range(4)]
        if folder == "listed":
            write_manifest(root / folder, make_manifest({"builder": "test"}, {"train": infos}, skipped=[]))
    return root


def fne_train(world: int, args: list[str], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """`python -m fne_dist.train ARGS` as `world` ranks (world 0: a lone process, no torch variables set)."""
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS} | {"OMP_NUM_THREADS": "1"} | (env or {})
    port = str(free_port())
    ranks = [{"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": port} for r in range(world)] or [{}]
    procs = [subprocess.Popen([sys.executable, "-m", "fne_dist.train", *args], cwd=ROOT, env=base | rank_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank_env in ranks]
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


# case: (ranks (0: a lone process), arguments after the base config, extra environment, what the line must say)
CASES = {
    "too few shards for ranks x workers": (
        2, ["data.workers=4"], None,
        ["4 shards cannot feed 2 ranks x 4 workers = 8 readers", "use data.workers=2 or fewer"]),
    "an epoch shorter than one global batch": (
        2, ["data.batch_size=16"], None,
        ["epoch_pairs=16 (the manifest's count) is less than one global batch (16 x 2 ranks)",
         "lower data.batch_size"]),
    "shards without a manifest": (
        0, ["data.train={shards}/unlisted/train-{{000000..000003}}.tar"], None,
        ["cannot tell how many pairs an epoch holds", "data.epoch_pairs or train.steps_per_epoch"]),
    "a shard scheme without an opener": (
        0, ["data.train=gs://bucket/train-{{0..3}}.tar", "data.epoch_pairs=64"], None,
        ["'gs:' has no opener", "pipe:gsutil cat"]),
    "missing eval shards": (
        0, ["data.val={shards}/listed/test-{{000000..000001}}.tar"], None,
        ["2 of its files do not exist", "fne-make-shards"]),
    "an unknown model": (0, ["model.name=ViT-B-61"], None, ["model.name='ViT-B-61' is neither", "did you mean"]),
    "resume latest without a checkpoint": (
        0, ["--resume", "latest"], None, ["resume=latest: no checkpoint in", "use resume=auto"]),
    "half a process group": (
        0, [], {"RANK": "0", "WORLD_SIZE": "2"},
        ["RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not", "start the ranks with torchrun"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_from_rank_0_and_exit_2_on_every_rank(case, shards, tmp_path):
    world, args, env, says = CASES[case]
    base = ["--config", DEMO, f"data.train={shards}/listed/train-{{000000..000003}}.tar",
            "data.val=null", "data.batch_size=4", f"train.output_dir={tmp_path / 'run'}"]
    ranks = fne_train(world, base + [a.format(shards=shards) for a in args], env)
    assert [r.returncode for r in ranks] == [2] * len(ranks), ranks[0].stderr[-3000:]
    [line] = ranks[0].stderr.splitlines()  # nothing else: no traceback, no log line of anything built
    assert line.startswith("fne-train: error: ") and all(s in line for s in says), line
    assert all(r.stdout == "" for r in ranks) and all(r.stderr == "" for r in ranks[1:])


def test_a_foreign_manifest_is_named_with_the_fix(tmp_path):
    shard = tmp_path / shard_name("train", 0)
    for text, problem in (('{"format": "img2dataset"}', "not a manifest of ours (format 'img2dataset'"),
                          ("[1, 2", "is not valid JSON")):
        (tmp_path / MANIFEST).write_text(text)
        with pytest.raises(DataError, match=f"{re.escape(problem)}.*move it away"):
            count_pairs([str(shard)])


@pytest.fixture
def evaluable(tmp_path, monkeypatch):
    """A checkpoint of the demo's towers (ZeRO-1 layout, no engine needed to read it) and 4 digit images to
    evaluate on; fne-eval's `embed` fails the test if reached."""
    towers = build_towers(load_config(DEMO).model)
    tag = fake_checkpoint(tmp_path, towers.architecture)
    torch.save({"module": towers.model.state_dict()}, tag / checkpoint.DS_MODEL_STATES)
    inks = np.random.default_rng(0).integers(0, 17, size=(4, 8, 8)).astype(float)
    write_shard(tmp_path / "test-000000.tar", [ShardSample(f"{i:03d}", render(ink, 32), "png", [f"the digit {i}"],
                                                           image_id=i) for i, ink in enumerate(inks)])
    monkeypatch.setattr(fne_eval, "embed", lambda *a, **k: pytest.fail("embedded before the check"))
    return tmp_path


def test_fne_eval_refuses_a_protocol_the_set_does_not_fit_before_embedding(evaluable, capsys):
    argv = ["--checkpoint", str(evaluable), f"data.val={evaluable / 'test-000000.tar'}", "--protocol", "coco5k"]
    assert fne_eval.main(argv) == 2
    assert error_lines(capsys) == ["fne-eval: error: protocol 'coco5k' needs the 5000-image Karpathy test split, got "
                                   "4 images: evaluate the test split's shards, or use protocol 'full'"]


def test_tower_weights_of_another_network_are_a_user_error(tmp_path):
    """Found while the towers are built (the weights must be read), and said as one line like the others."""
    bad = tmp_path / "lite0.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(USER_ERRORS, match="cannot map by order onto EfficientNet's"):
        build_towers(tower_config(f"model.image_tower.weights={bad}"))
