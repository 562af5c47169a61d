"""``fastfactor bench`` on the CPU pins threads and reports the spread; small items of issue 13:
distinct plot colours, Monarch warns when it keeps less than asked, the summary row that was
called "offline" says what it is."""

import json
import warnings

import pytest
import torch
from torch import nn

from fastfactor import cli
from fastfactor.bench import report


def test_cpu_bench_pins_threads_and_reports_min_median_max(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc = cli.main(["bench", "--preset", "issue2-lowrank", "--ratios", "0.5", "--tokens", "8", "--device", "cpu",
                       "--out", str(tmp_path), "--name", "r", "--rep-ms", "1", "--warmup-ms", "0", "--quiet"])
        assert rc == 0
        assert torch.get_num_threads() == 2, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert "CPU threads: 1 (pinned)" in printed and "min_ms" in printed and "max_ms" in printed
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["meta"]["threads"] == 1 and "Threads pinned to 1" in doc["meta"]["note"]
    for r in doc["rows"]:
        assert r["runs"] >= 3
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], r


def test_bench_threads_option(tmp_path):
    rc = cli.main(["bench", "--preset", "issue2-lowrank", "--ratios", "0.5", "--tokens", "8", "--device", "cpu",
                   "--json", str(tmp_path / "r.json"), "--rep-ms", "1", "--warmup-ms", "0", "--quiet", "--threads", "2"])
    assert rc == 0
    assert json.loads((tmp_path / "r.json").read_text())["meta"]["threads"] == 2
    assert cli.main(["bench", "--device", "cpu", "--threads", "-1", "--quiet"]) == 2


@pytest.mark.parametrize("n", [3, 10, 12, 20, 27])
def test_plot_line_colours_never_repeat(n):
    cols = report.line_colors(n)
    assert len(cols) == n and len(set(cols)) == n


def test_plot_legend_colours_are_distinct(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = {}

    def capture(fig, path, **kw):
        for ax in fig.axes:
            lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            seen[id(ax)] = [tuple(matplotlib.colors.to_rgba(ln.get_color())) for ln in lines]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    rows = [dict(method=m, tokens=t, direction=d, ratio=q, shape="64x64", dtype="fp32", median_ms=1.0, tflops=1.0,
                 speedup_vs_dense=1.0)
            for m in ("lowrank", "monarch", "block_lowrank") for t in (8, 64) for d in ("fwd", "fwd+bwd")
            for q in (0.25, 0.5)]  # 12 lines per panel: the default cycle would repeat two colours
    meta = {"device": "cpu", "commit": "x" * 10, "date": "2026-01-01"}
    assert report.write_plot(str(tmp_path / "p.png"), meta, rows) is None
    assert seen and all(len(c) == 12 and len(set(c)) == 12 for c in seen.values())


def test_monarch_warns_when_it_keeps_less_than_asked():
    from fastfactor import BlockLowRankLinear, MonarchLinear

    lin = nn.Linear(24, 37)
    for cls in (MonarchLinear, BlockLowRankLinear):
        with pytest.warns(UserWarning, match=r"ratio 0.5 asked .* rank 1 keeps 0.288 of the weights .* rank 2 would keep 0.577"):
            m = cls.from_linear(lin, nblocks=4, ratio=0.5)
        assert m.num_weight_params / (24 * 37) == pytest.approx(0.288, abs=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MonarchLinear.from_linear(nn.Linear(64, 64), nblocks=4, ratio=0.5)  # exact: no warning
        MonarchLinear.from_linear(lin, nblocks=4, rank=1)  # a rank given: the user chose


def test_summary_row_says_after_the_last_swap():
    import fastfactor.compress as C
    from fastfactor.compress._tiny import tiny_data, tiny_model

    _, rep = C.compress(tiny_model("bert"), dict(method="lowrank", ratio=0.5, schedule="all_at_once", final_steps=1,
                                                 batch_size=8), tiny_data())
    table = rep.summary_table()
    assert "(after the last swap, before fine-tuning)" in table and "(offline)" not in table
