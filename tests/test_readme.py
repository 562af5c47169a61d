"""The README's snippets run as written: every ```python block is executed (in order, in a folder
holding the ``train.csv`` / ``dev.csv`` it names), each ``print(...)  # expected`` comment is
checked against what was printed, and the ``fastfactor compress`` command runs end to end on the
bundled all-MiniLM-L6-v2 with a labelled CSV (tiny step counts appended)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POS = ["a wonderful film", "great acting and a moving story", "I loved every minute", "brilliant and funny"]
NEG = ["a dull mess", "boring and far too long", "I hated it", "the plot makes no sense"]


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _readme(), flags=re.S)


def _write_data(d):
    rows = [(POS[i % 4], "pos") if i % 2 else (NEG[i % 4], "neg") for i in range(32)]
    (d / "train.csv").write_text("sentence,label\n" + "\n".join(f"{s},{y}" for s, y in rows) + "\n")
    (d / "dev.csv").write_text("sentence,label\n" + "\n".join(f"{s},{y}" for s, y in rows[:8]) + "\n")
    (d / "dev.json").write_text("\n".join(json.dumps({"sentence": s, "label": y}) for s, y in rows[:8]) + "\n")


def _minilm():
    try:
        from fastfactor.compress.demo import minilm_path

        return minilm_path()
    except RuntimeError as e:
        pytest.skip(str(e))


def test_readme_has_the_snippets_this_test_runs():
    py = _blocks("python")
    assert len(py) >= 2 and any("lowrank_linear(x, u, v, bias)" in b for b in py)
    assert sum(len(b) for _, b in _sections()) == len(py)  # every block belongs to a section that runs
    assert any("fastfactor compress --model" in b for b in _blocks("bash"))


def _sections() -> list[tuple[str, list[str]]]:
    """``(heading, python blocks)`` per ``## `` section that has any: the blocks of a section are one
    session (a later block may use what an earlier one defined), as a reader runs them."""
    out = []
    for part in re.split(r"^## ", _readme(), flags=re.M)[1:]:
        blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
        if blocks:
            out.append((part.splitlines()[0].strip(), blocks))
    return out


#: a ``print(...)  # comment`` whose comment looks like output (a value or repr) is checked against
#: what was printed; descriptive comments are left alone
_OUTPUT_LIKE = re.compile(r"^[A-Za-z_][\w.]*(\(.*\)|\[.*\])?$")


@pytest.mark.parametrize("heading,blocks", [
    pytest.param(h, b, id=h[:40],
                 marks=[pytest.mark.slow] if any("minilm" in x for x in b) else [])  # a real model: slow
    for h, b in _sections()
])
def test_python_snippets_run_as_written(heading, blocks, tmp_path, monkeypatch):
    if any("minilm" in b for b in blocks):
        _minilm()
    _write_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README.md '{heading}' python block {i}", "exec"), namespace)
        printed = out.getvalue()
        for expr, expected in re.findall(r"^[ \t]*print\((.*)\)[ \t]*#[ \t]*(.+)$", code, flags=re.M):
            expected = expected.strip()
            if _OUTPUT_LIKE.match(expected):
                assert expected in printed, f"print({expr}) should show {expected!r}; printed:\n{printed}"


@pytest.mark.slow
def test_readme_cli_command_on_minilm_with_a_labelled_csv(tmp_path, capsys):
    """The README's command, placeholders filled in, with a labelled CSV/JSON whose labels are
    text (neg/pos) on the bundled headless all-MiniLM-L6-v2; tiny step counts appended."""
    from fastfactor.cli import main

    path = _minilm()
    cmd = next(b for b in _blocks("bash") if "fastfactor compress --model" in b)
    cmd = cmd.replace("\\\n", " ").replace("[--distill]", "")
    argv = shlex.split(cmd)
    assert argv[:2] == ["fastfactor", "compress"]
    argv = [{"PATH": path, "train.csv": str(tmp_path / "train.csv"), "dev.json": str(tmp_path / "dev.json"),
             "DIR": str(tmp_path / "out")}.get(a, a) for a in argv[1:]]
    _write_data(tmp_path)
    fast = ["--steps", "1", "--stage-steps", "1", "--calib-batches", "1", "--batch-size", "4", "--max-length", "16",
            "--max-train", "12", "--max-eval", "6", "--no-progress"]
    assert main(argv + fast) == 0
    text = capsys.readouterr().out
    assert "a new classification head for 2 classes (0=neg, 1=pos)" in text and "final report" in text
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["params_after"] < rep["params_before"] and rep["config"]["init"] == "activation"
