"""A newcomer's path (issue 25): the README's "Your own data" commands as written, on generated transparent icons
with shared captions; DeepSpeed compiles nothing on a CPU; settings sized for another set are named at start-up;
the log reports the buffer and the posterior."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, TINY
from fne_dist.config import FNESection
from fne_dist.objective import Objective, sizing_advice

# the benchmark's generator of transparent icons with shared captions (benchmarks/startup.py)
_spec = importlib.util.spec_from_file_location("startup_bench", ROOT / "benchmarks" / "startup.py")
startup_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(startup_bench)


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Your own data\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_own_data_commands_run_as_written(tmp_path):
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["fne-make-shards", "fne-train", "fne-eval", "fne-export"]
    startup_bench.make_icon_set(tmp_path / "my_icons", n_images=160, size=32)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}
    bin_dir = Path(sys.executable).parent
    # for speed: the tiny towers, two short epochs
    fast = [f"model.name={TINY}", "model.image_tower=null", "model.text_tower=null", "model.embed_dim=null",
            "train.epochs=2", "train.log_every=1", "data.workers=1"]
    outputs = {}
    for command in commands:
        argv = shlex.split(command)
        argv += fast if argv[0] == "fne-train" else []
        done = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
        outputs[argv[0]] = done.stderr + done.stdout  # the first lines are on stderr
    shards = tmp_path / "runs/my_icons/shards"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test"} and manifest["split"]["group_column"] == "caption"
    with tarfile.open(shards / "train-000000.tar") as tar:
        png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    assert Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # not black
    train_log = outputs["fne-train"]
    assert train_log.startswith("fne-train: loading torch and open_clip ...")
    assert "Setting accelerator to CPU" not in train_log and "deepspeed_shm_comm" not in train_log
    assert not extensions.exists() or not any(extensions.iterdir())  # nothing compiled
    assert "step 1/" in train_log and "fne.objective=soft_clip reads no negative buffer" in train_log
    # soft_clip weighs by the posterior, so the log tells where it stays off (the tiny random towers find no
    # mutually top-1 pair among these shared captions)
    assert "epoch 1: the posterior is still off: 0 positives counted" in train_log
    records = [json.loads(line) for line in (tmp_path / "runs/my_icons/fne/metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"]: r["warmup"] for r in records if r["kind"] == "train"} == {0: False, 1: False}  # soft_clip
    metrics = json.loads((tmp_path / "runs/my_icons/test.json").read_text())["metrics"]
    assert 0 <= metrics["rsum"] <= 600 and outputs["fne-eval"].startswith("fne-eval: loading torch and open_clip")
    assert "WARNING" not in outputs["fne-eval"]  # nothing that is not the user's business
    assert (tmp_path / "runs/my_icons/model.pt").is_file() and (tmp_path / "runs/my_icons/model.json").is_file()


def test_deepspeed_compiles_no_op_on_cpu(tmp_path):
    code = ("from fne_dist.distributed import init_distributed; import deepspeed.comm.comm as c; "
            "init_distributed(); print('shm op:', c.cdb.shm_comm_op)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shm op: None" in done.stdout and not (tmp_path / "ext").exists()


def test_sizing_advice_names_the_value_to_use():
    small = FNESection(queue_size=2048, min_count=200, mode="bayes", stats_reset="never", warmup_epochs=1)
    queue, count = sizing_advice(small, epoch_pairs=576, global_batch=32, total_steps=24)
    assert "fne.queue_size=2048 is longer than the 576 pairs" in queue and "set fne.queue_size=544" in queue
    assert "never fills in this run's 24 steps" in queue
    # 24 steps of 32 pairs, the first 18 in warm-up: at most 6 x 32 positives
    assert "fne.min_count=200 cannot be reached: at most 192 positives are counted in this run" in count
    assert "set fne.min_count=48" in count
    fits = FNESection(queue_size=512, min_count=100, mode="bayes", stats_reset="never", warmup_epochs=1)
    assert sizing_advice(fits, epoch_pairs=576, global_batch=32, total_steps=54) == []
    per_epoch = FNESection(queue_size=64, min_count=100, mode="bayes", stats_reset="epoch", warmup_epochs=0)
    [count] = sizing_advice(per_epoch, epoch_pairs=96, global_batch=32, total_steps=30)
    assert "at most 96 positives are counted in an epoch" in count and "set fne.min_count=24" in count
    assert sizing_advice(fits, epoch_pairs=576, global_batch=32, total_steps=18) == [
        "the run's 18 steps are all fne.warmup_epochs=1 warm-up, so the posterior never switches on; train more "
        "epochs than fne.warmup_epochs"]
    # an objective without a warm-up counts positives from the first step
    no_warmup = FNESection(objective="posterior_infonce", queue_size=64, min_count=10, warmup_epochs=1)
    assert sizing_advice(no_warmup, epoch_pairs=576, global_batch=32, total_steps=18) == []
    clip = FNESection(objective="clip", queue_size=64, min_count=10**6, warmup_epochs=0)
    assert sizing_advice(clip, epoch_pairs=576, global_batch=32, total_steps=10) == []  # no posterior to wait for


def test_news_reports_the_full_buffer_and_the_posterior_once():
    torch.manual_seed(0)
    objective = Objective(FNESection(queue_size=16, min_count=10, mode="bayes", stats_reset="never"), 8,
                          torch.device("cpu"), seed=0)
    said = []
    for step in range(4):
        x = F.normalize(torch.randn(8, 8), dim=1)  # identical image and text features: every row mutually top-1
        ids = torch.arange(8) + 8 * step
        out = objective.loss(x, x, x, x, ids, ids, step=step, rank=0, warmup=False)
        objective.commit(out)
        said.append(objective.news())
    assert said[0] == []
    assert said[1] == ["the negative buffer is full (16 keys, fne.queue_size)",
                       "the posterior is on: 16 positives counted, more than fne.min_count=10"]
    assert said[2:] == [[], []] and objective.posterior_off() is None
    fresh = Objective(FNESection(queue_size=16, min_count=10, mode="bayes"), 8, torch.device("cpu"), seed=0)
    assert "still off: 0 positives counted" in fresh.posterior_off()


def test_metrics_mark_warmup_only_for_objectives_that_have_one():
    from fne_dist.train import Trainer

    for objective, warms in (("fne", True), ("vsepp", False), ("clip", False), ("posterior_infonce", False)):
        fne = FNESection(objective=objective, warmup_epochs=1, queue_size=64)
        trainer = SimpleNamespace(cfg=SimpleNamespace(fne=fne), objective=Objective(fne, 8, torch.device("cpu"), 0))
        assert (Trainer._warming(trainer, 0), Trainer._warming(trainer, 1)) == (warms, False), objective
