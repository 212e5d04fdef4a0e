"""fne-bench step runs end to end on the default model (the demo's tiny ViT, found from any working directory) with
either kind of keys and writes its row; with online keys the trainer it times has no momentum towers."""
import csv
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("keys", ["momentum", "online"])
def test_step_bench_row(tmp_path, keys):
    out = tmp_path / "step.csv"
    done = subprocess.run([sys.executable, "-m", "fne_dist.bench", "step", "--batch", "8", "--queue", "256",
                           "--steps", "1", "--warmup", "0", "--keys", keys, "--csv", str(out)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = list(csv.DictReader(out.open()))
    assert (row["model"], row["keys"], row["queue"], row["clock"]) == ("tiny-vit", keys, "256", "wall")
    assert float(row["clip_ms"]) > 0 and float(row["fne_ms"]) > 0
    target = {"momentum": 1.35, "online": 1.15}[keys]
    assert f"target of keys={keys})" in done.stdout and f"the {target}x target" in done.stdout
