"""The README's API snippet runs as written."""
import re

from conftest import ROOT


def test_readme_api_snippet_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## The FNE API\n\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["res"].index.shape == (8,) and scope["w"].shape == (8, 1000)
