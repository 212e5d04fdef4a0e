"""fne-bench step runs an objective's trainer step against the CLIP step end to end (the demo's tiny ViT, found
from any working directory; one CPU process) with either kind of keys, and writes its row: the objective, the keys,
the clock, the malloc setting, both medians and their ratio, and each step's page faults; with online keys the
trainer it times has no momentum towers, and for an objective that reads no keys (clip) the row says so ("none")
whatever --keys was."""
import csv
import os
import subprocess
import sys

import pytest

from conftest import ROOT


MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


@pytest.mark.parametrize("objective, keys, clock, target, read, malloc", [
    ("clip_queue", "momentum", "process", 1.15, "momentum", {}),
    ("fne", "online", "wall", 1.15, "online", MALLOC),
    ("clip", "momentum", "process", 1.15, "none", {})])
def test_step_bench_row(tmp_path, objective, keys, clock, target, read, malloc):
    out = tmp_path / "step.csv"
    env = {name: value for name, value in os.environ.items() if name not in MALLOC} | malloc
    done = subprocess.run([sys.executable, "-m", "fne_dist.bench", "step", "--objective", objective, "--keys", keys,
                           "--batch", "8", "--queue", "256", "--steps", "2", "--warmup", "1", "--clock", clock,
                           "--csv", str(out)],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = list(csv.DictReader(out.open()))
    assert (row["model"], row["objective"], row["keys"], row["queue"], row["clock"]) == (
        "tiny-vit", objective, read, "256", clock)
    assert row["malloc"] == ("mmap=33554432;trim=268435456" if malloc else "default")
    assert float(row["clip_faults"]) >= 0 and float(row["objective_faults"]) >= 0
    assert float(row["ratio"]) == pytest.approx(float(row["objective_ms"]) / float(row["clip_ms"]), abs=2e-3)
    assert f"{objective} step / CLIP step" in done.stdout and f"the {target}x target, keys={read})" in done.stdout
