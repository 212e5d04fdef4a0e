"""fne-bench step runs an objective's trainer step against the CLIP step end to end (tiny settings, one CPU
process) and writes its row: the objective, the clock, both medians and their ratio."""
import csv
import subprocess
import sys

import pytest

from conftest import ROOT


def test_step_bench_times_the_objective_it_is_given(tmp_path):
    out = tmp_path / "step.csv"
    run = subprocess.run([sys.executable, "-m", "fne_dist.bench", "step", "--objective", "clip_queue", "--batch", "4",
                          "--queue", "64", "--steps", "2", "--warmup", "1", "--clock", "process", "--csv", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "clip_queue step / CLIP step" in run.stdout
    (row,) = csv.DictReader(out.open())
    assert (row["objective"], row["clock"], row["batch"], row["queue"]) == ("clip_queue", "process", "4", "64")
    assert float(row["ratio"]) > 0
    assert float(row["ratio"]) == pytest.approx(float(row["objective_ms"]) / float(row["clip_ms"]), abs=2e-3)
