"""The README and docs keep what users and CI rely on: the test command, the sections the issues
ask for, links that resolve, and the test files named in their commands exist."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    assert "```bash\nmake test\n```" in readme
    assert "make test" in _read(".ci/run")


def test_readme_sections():
    headings = re.findall(r"^## (.+)$", _read("README.md"), flags=re.M)
    for needed in ("Test", "Quick start", "Test tiers", "Compressing a model", "Runs that survive",
                   "Benchmarks and profiling"):
        assert any(h.startswith(needed) for h in headings), f"README.md lost its section {needed!r}"


def test_links_and_named_tests_exist():
    for doc in ("README.md", "docs/ROBUSTNESS.md", "BENCHMARKS.md"):
        text = _read(doc)
        for target in re.findall(r"\]\(([^)#:]+)\)", text):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
            assert os.path.exists(path), f"{doc}: link to {target} does not resolve"
        for test in set(re.findall(r"tests/[\w/]+\.py", text)):
            assert os.path.isfile(os.path.join(ROOT, test)), f"{doc}: names {test}, which does not exist"
