"""A reduced `make demo` end to end: the bundled MiniLM, real stdlib text, two methods."""

import json

import pytest

from fastfactor.compress import demo


def test_stdlib_sentences_are_real_distinct_english():
    s = demo.stdlib_sentences(seed=0)
    assert len(s) > 1000 and len(set(x.lower() for x in s)) == len(s)
    assert all(6 <= len(x.split()) <= 40 and x[0].isupper() and x[-1] in ".!?" for x in s)
    assert s[:50] == demo.stdlib_sentences(seed=0)[:50] and s[:50] != demo.stdlib_sentences(seed=1)[:50]


def test_reduced_demo_end_to_end(tmp_path, capsys):
    try:
        demo.minilm_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    rc = demo.main(["--quick", "--threads", "1", "--methods", "lowrank", "sparse24", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cos offline" in out and "ρ tuned" in out and "dense (reference)" in out
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lowrank", "sparse24"]
    for r in rows:
        if "error" in r:  # a layer family absent from this build is reported, not hidden
            assert "not available" in r["error"]
            continue
        assert r["params"] < r["params_before"]
        for k in ("cosine_offline", "cosine_tuned", "spearman_offline", "spearman_tuned"):
            assert -1.0 <= r[k] <= 1.0
    assert (tmp_path / "demo.md").read_text().count("\n") >= 4
