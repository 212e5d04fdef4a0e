"""The module layout: no import circles anywhere in the package, a core that imports nothing from the trainer, data,
study or benchmarks, data that imports no trainer, a config that does not pull in the samplers, one home for helpers
that were written several times."""
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


PACKAGES = {"fne_dist": "fne_dist", "fne_kernels": "kernels"}  # import name -> folder
CORE = {"fne_dist.weights", "fne_dist.stats", "fne_dist.rng", "fne_dist.sample_result", "fne_dist.sampler",
        "fne_dist.fne", "fne_kernels"}  # the rule, the statistics, the samplers and the kernels
TRAINER = {"fne_dist.train", "fne_dist.checkpoint", "fne_dist.momentum", "fne_dist.model", "fne_dist.pretrained",
           "fne_dist.evaluate", "fne_dist.export", "fne_dist.launch", "fne_dist.job", "fne_dist.preemption",
           "fne_dist.metrics_log", "fne_dist.objective", "fne_dist.objectives", "fne_dist.config", "fne_dist.cli",
           "fne_dist.demo"}


def module_names() -> dict[str, object]:
    """Every module of the two packages by import name -> its file."""
    names = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of the packages it imports, at the top or inside a function (an import that runs
    later still makes a circle)."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def within(module: str, groups) -> bool:
    return any(module == g or module.startswith(g + ".") for g in groups)


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circles():
    graph = import_graph()
    circles = sorted(m for m in graph if m in reachable(graph, m))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_core_imports_nothing_from_trainer_data_study_or_benchmarks():
    graph = import_graph()
    outside = TRAINER | {"fne_dist.data", "fne_dist.study", "fne_dist.bench"}
    for module in (m for m in graph if within(m, CORE)):
        assert not {m for m in reachable(graph, module) if within(m, outside)}, module


def test_data_imports_no_trainer():
    graph = import_graph()
    for module in (m for m in graph if within(m, {"fne_dist.data"})):
        assert not {m for m in reachable(graph, module) if within(m, TRAINER)}, module


def test_the_graph_sees_the_packages():
    """The rules above read a real graph: the packages are there and their known edges are found."""
    graph = import_graph()
    assert {"fne_dist.data.loader", "fne_dist.bench.cli", "fne_dist.study.run", "fne_dist.objectives.triplet",
            "fne_kernels.fne_sampler"} <= set(graph)
    assert "fne_dist.data.remote" in graph["fne_dist.data.loader"]
    assert "fne_dist.train" in reachable(graph, "fne_dist.job")


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
