"""The module layout: no import cycles between the trainer and the job, a config that does not pull in the
samplers, one home for helpers that were written several times."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def modules_after(statement: str) -> set[str]:
    code = f"{statement}; import sys; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split())


@pytest.mark.parametrize("module, never", [
    ("fne_dist.config", {"fne_dist.fne", "fne_dist.sampler", "fne_dist.rng", "fne_kernels"}),
    ("fne_dist.train", {"fne_dist.job"}),  # the trainer needs no launcher code
    ("fne_dist.job", {"fne_dist.train"}),  # imported inside the job only
    # the sampler stack and its benchmark run on the GPU image, which has none of these (ENVIRONMENT.md)
    ("fne_dist.fne", {"deepspeed", "open_clip", "webdataset", "omegaconf", "submitit"}),
    ("fne_kernels.bench_sampler", {"deepspeed", "open_clip", "webdataset", "omegaconf", "submitit"}),
])
def test_imports_stay_one_way(module, never):
    assert not modules_after(f"import {module}") & never


def test_free_port_is_written_once():
    sources = [p for d in ("fne_dist", "tests", "kernels") for p in (ROOT / d).rglob("*.py")]
    homes = [p.name for p in sources if re.search(r"def _?free_port\(", p.read_text())]
    assert homes == ["distributed.py"]
