"""The module layout: no import cycles between the trainer and the job, a config that does not pull in the
samplers, one home for helpers that were written several times."""
import ast
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


def test_stop_request_keeps_no_method_for_the_tests_alone():
    """Every public member of StopRequest is used by the package's code (not only by tests, as `should_stop` was
    while job.py said the trainer used it), and every `StopRequest.name` that the package or the docs mention
    exists."""
    from fne_dist.preemption import StopRequest

    texts = [p.read_text() for p in (ROOT / "fne_dist").rglob("*.py")]
    used = {node.attr for text in texts for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Attribute)}
    public = {name for name in vars(StopRequest) if not name.startswith("_")}
    assert public - used == set()
    readmes = [ROOT / "README.md", ROOT / "slurm" / "README.md", *ROOT.glob("docs/**/*.md")]
    docs = [*texts, *(p.read_text() for p in readmes)]
    mentioned = {name for text in docs for name in re.findall(r"StopRequest\.(\w+)", text)}
    assert mentioned - set(dir(StopRequest)) == set()
