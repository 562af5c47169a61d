"""fastfactor bench: the CPU small mode end to end (JSON schema, CSV, plot), the FLOP/byte/roofline
arithmetic, timing helpers, presets, argument errors, graceful degradation, the e2e model swap."""

import csv
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastfactor import cli
from fastfactor.bench import families, report, shapes, timing
from fastfactor.bench.e2e import encoder_linear_filter, swap_linears
from fastfactor.bench.runner import BenchConfig, Runner, make_call
from fastfactor.layers.base import FactorizedLinear
from fastfactor.layers.lowrank import LowRankLinear

FAST = ["--rep-ms", "1", "--warmup-ms", "0", "--quiet"]


def _bench(tmp_path, *args):
    out = tmp_path / "out"
    rc = cli.main(["bench", *args, "--device", "cpu", "--out", str(out), "--name", "r", *FAST])
    return rc, out


# --------------------------------------------------------------------------------------------
# the CPU small mode through the command line
# --------------------------------------------------------------------------------------------

def test_cpu_small_mode_writes_schema_csv_and_plot(tmp_path, capsys):
    rc, out = _bench(tmp_path, "--preset", "issue2-lowrank", "--ratios", "0.25,0.5", "--tokens", "8")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "CPU figures" in printed and "lowrank" in printed
    doc = json.loads((out / "r.json").read_text())
    assert doc["schema"] == report.SCHEMA
    meta = doc["meta"]
    for key in ("commit", "date", "device", "cpu_figures", "note", "roofline", "command", "torch"):
        assert key in meta, key
    assert meta["cpu_figures"] is True and meta["device_type"] == "cpu"
    assert meta["note"].startswith("CPU figures") and "Small mode" in meta["note"]
    assert meta["roofline"]["bandwidth_gbs"] > 0 and meta["roofline"]["matrix_tflops"]["fp32"] > 0
    rows = doc["rows"]
    assert all(set(r) == set(report.ROW_FIELDS) for r in rows)
    # small mode: cpu-small shapes × 1 token count × 2 directions; dense + 2 ratios each
    assert {r["shape"] for r in rows} == {s.name for s in shapes.SHAPE_PRESETS["cpu-small"]}
    assert {r["method"] for r in rows} == {"dense", "lowrank"}
    assert len(rows) == 3 * 2 * (1 + 2)
    for r in rows:
        assert r["cpu_figures"] is True and r["dtype"] == "fp32" and r["timing"] == "cpu_timer"
        assert r["median_ms"] > 0 and r["floor_ms"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["gbs"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["median_ms"])
        if r["method"] == "lowrank":
            assert r["unfused_ms"] > 0
            assert r["speedup_vs_unfused"] == pytest.approx(r["unfused_ms"] / r["median_ms"])
            assert r["torch24_ms"] is None
    with open(out / "r.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert csv_rows[0]["commit"] == meta["commit"] and csv_rows[0]["cpu_figures"] == "True"
    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_family_registered_by_user_code_is_benchmarked(tmp_path, monkeypatch):
    """The bench sweeps fastfactor.families: a family declared by user code joins it by name.
    (Families are imported directly, so none can be absent: the old skip-when-missing path is gone.)"""
    import dataclasses

    from fastfactor import families as FF

    assert families.FAMILIES is FF.FAMILIES
    ghost = dataclasses.replace(FF.FAMILIES["lowrank"], name="ghost", unfused="n/a")
    monkeypatch.setitem(FF.FAMILIES, "ghost", ghost)
    rc, out = _bench(tmp_path, "--methods", "ghost,lowrank", "--ratios", "0.5", "--shapes", "40x24",
                     "--tokens", "5", "--directions", "fwd")
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert {r["method"] for r in doc["rows"]} == {"dense", "lowrank", "ghost"}
    g = next(r for r in doc["rows"] if r["method"] == "ghost")
    l = next(r for r in doc["rows"] if r["method"] == "lowrank")
    assert g["flops"] == l["flops"] > 0


@pytest.mark.parametrize(
    "args, match",
    [
        (["--methods", "svd"], "methods: expected names"),
        (["--shapes", "12xfoo"], "shapes: expected"),
        (["--dtypes", "fp8"], "dtypes: expected"),
        (["--directions", "sideways"], "directions: expected"),
        (["--e2e", "--e2e-models", "gpt2"], "e2e-models: expected"),
    ],
    ids=["method", "shape", "dtype", "direction", "e2e-model"],
)
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, capsys, args, match):
    rc = cli.main(["bench", "--device", "cpu", *args, *FAST])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_list_names_every_preset_and_family(capsys):
    assert cli.main(["bench", "--list"]) == 0
    text = capsys.readouterr().out
    for name in list(shapes.SWEEPS) + list(families.FAMILIES):
        assert name in text


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------

def test_issue_presets_hold_the_published_grids():
    s2 = shapes.SWEEPS["issue2-lowrank"]
    assert [(s.in_features, s.out_features) for s in s2.shapes] == [(768, 768), (4096, 4096), (8192, 8192)]
    assert s2.tokens == (16, 4096, 16384) and s2.params["lowrank"] == (0.125, 0.25, 0.5)
    assert s2.dtypes == ("bf16",) and s2.directions == ("fwd", "fwd+bwd")
    s3 = shapes.SWEEPS["issue3-monarch"]
    assert [(s.in_features, s.out_features) for s in s3.shapes] == [(768, 3072), (3072, 768), (4096, 4096)]
    assert s3.params["monarch"] == (2, 4, 8)
    s4 = shapes.SWEEPS["issue4-sparse24"]
    assert s4.tokens == (16, 64, 4096, 16384) and s4.params["dense_sparse"] == (0.25, 0.5)
    assert set(s4.methods) == {"sparse24", "dense_sparse"}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("768", [(768, 768)]),
        ("768x3072, 4096x11008", [(768, 3072), (4096, 11008)]),
        ("bert-base", [(768, 768), (768, 3072), (3072, 768)]),
        ("llama-70b", [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)]),
        ("bert-base,768x3072", [(768, 768), (768, 3072), (3072, 768)]),  # duplicates removed
    ],
    ids=["square", "rect-list", "preset", "gqa-preset", "dedup"],
)
def test_parse_shapes(spec, expected):
    assert [(s.in_features, s.out_features) for s in shapes.parse_shapes(spec)] == expected


@pytest.mark.parametrize("spec", ["", "0x5", "3x4x5", "big"], ids=["empty", "zero", "3d", "word"])
def test_parse_shapes_rejects(spec):
    with pytest.raises(ValueError, match="shapes: expected"):
        shapes.parse_shapes(spec)


def test_parse_dtypes():
    assert report.parse_dtypes("bf16, float16,fp32") == [torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(ValueError, match="dtypes: expected"):
        report.parse_dtypes("int8")


# --------------------------------------------------------------------------------------------
# FLOPs, bytes, roofline
# --------------------------------------------------------------------------------------------

def test_lowrank_flops_are_the_factorized_work():
    m = LowRankLinear(37, 53, 7)
    flops, formula = families.FAMILIES["lowrank"].fwd_flops(m, 11)
    assert flops == 2 * 11 * 7 * (37 + 53) == 2 * 11 * m.num_weight_params
    assert "r" in formula
    assert families.flops_for("fwd+bwd", flops) == 3 * flops
    assert families.flops_for("bwd", flops) == 2 * flops


def test_compulsory_bytes():
    # fwd: read x (M·K), write y (M·N), read the weights once
    assert families.bytes_for("fwd", 10, 3, 5, 2, 100) == 2 * 10 * 8 + 100
    # bwd: read g and x, write dx, read weights, write their gradients
    assert families.bytes_for("bwd", 10, 3, 5, 2, 100) == 2 * 10 * (5 + 6) + 200
    assert families.bytes_for("fwd+bwd", 10, 3, 5, 2, 100) == 160 + 100 + 220 + 200
    m = LowRankLinear(6, 4, 2)
    assert families.module_bytes(m) == 4 * (4 * 2 + 2 * 6 + 4)


def test_roofline_floor_picks_the_binding_limit():
    roof = timing.Roofline("test", {"bf16": 100.0}, 1000.0, 1, 1)  # 100 TFLOP/s, 1000 GB/s
    ms, bound = roof.floor_ms(2e12, 1e6, "bf16")  # 20 ms of math vs 1 µs of traffic
    assert bound == "compute" and ms == pytest.approx(20.0)
    ms, bound = roof.floor_ms(1e6, 4e9, "bf16")  # 4 ms of traffic
    assert bound == "memory" and ms == pytest.approx(4.0)


# --------------------------------------------------------------------------------------------
# timing helpers and the timed calls
# --------------------------------------------------------------------------------------------

def test_time_calls_cycles_through_every_rotated_input():
    counts = [0, 0, 0]

    def make(i):
        def f():
            counts[i] += 1
        return f

    t = timing.time_calls([make(i) for i in range(3)], torch.device("cpu"), warmup_ms=0, rep_ms=1)
    assert t.mode == "cpu_timer" and t.ms >= 0
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="calls: expected at least one"):
        timing.time_calls([], torch.device("cpu"))


def test_rotation_count_on_cpu():
    assert timing.rotation_count(10, torch.device("cpu")) == 2


@pytest.mark.parametrize("direction", ["fwd", "bwd", "fwd+bwd"])
def test_make_call_computes_the_right_direction(direction):
    x = torch.randn(9, 7, dtype=torch.float64)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 5, dtype=torch.float64)
    out = make_call(lambda t: F.linear(t, w), x, g, [w], direction)()
    if direction == "fwd":
        torch.testing.assert_close(out, x @ w.detach().t())
        assert not out.requires_grad
    else:
        dx, dw = out
        torch.testing.assert_close(dx, g @ w.detach())
        torch.testing.assert_close(dw, g.t() @ x)


class _Fake24(FactorizedLinear):
    """A stand-in 2:4 module (keeps the first two of every four weights) for the runner's 2:4 path."""

    method = "fake24"

    def __init__(self, w, b):
        super().__init__()
        self.out_features, self.in_features = w.shape
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[:, 0::4] = True
        mask[:, 1::4] = True
        self.register_buffer("mask", mask)
        self.weight = nn.Parameter(w.detach().clone())
        self.bias = nn.Parameter(b.detach().clone()) if b is not None else None

    @classmethod
    def from_linear(cls, lin):
        return cls(lin.weight, lin.bias)

    @property
    def num_weight_params(self):
        return self.weight.numel() // 2

    def dense_weight(self):
        return self.weight * self.mask

    def forward(self, x):
        return F.linear(x, self.dense_weight(), self.bias)

    forward_unfused = forward


def test_runner_2to4_path_notes_that_torch_semi_structured_needs_cuda(monkeypatch):
    from fastfactor import families as FF

    def random_layer(in_f, out_f, _param, dtype, device, bias, opts):
        return _Fake24.from_linear(nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype))

    fam = FF.Family("fake24", _Fake24, inits=(FF.Init("magnitude", lambda view, ratio, config, stats: None),),
                    fwd_flops=FF.FAMILIES["sparse24"].fwd_flops, random_layer=random_layer,
                    param_name="", defaults=(None,), unfused="dense matmul", torch24=True)
    monkeypatch.setitem(families.FAMILIES, "fake24", fam)
    cfg = BenchConfig(methods=["fake24"], shapes=[shapes.Shape(16, 12)], tokens=[3], dtypes=[torch.float32],
                      directions=["fwd"], device=torch.device("cpu"), rep_ms=1, warmup_ms=0, cpu_figures=True)
    roof = timing.Roofline("cpu", {"fp32": 1.0}, 1.0, 1, 1)
    runner = Runner(cfg, roof, log=lambda m: None)
    rows = runner.run()
    row = [r for r in rows if r["method"] == "fake24"][0]
    assert row["ratio"] == 0.5 and row["param"] == "2:4" and row["flops"] == 3 * 16 * 12
    assert row["torch24_ms"] is None
    assert any("needs a CUDA device" in m for m in runner.messages)


# --------------------------------------------------------------------------------------------
# graceful degradation
# --------------------------------------------------------------------------------------------

def test_table_without_tabulate_is_plain_text(monkeypatch):
    rows = [{"method": "lowrank", "median_ms": 1.5, "tokens": 16, "empty": None}]
    monkeypatch.setitem(sys.modules, "tabulate", None)
    text = report.format_table(rows, ("method", "tokens", "median_ms", "empty"))
    lines = text.splitlines()
    assert lines[0].split() == ["method", "tokens", "median_ms"]  # all-empty column dropped
    assert lines[2].split() == ["lowrank", "16", "1.5"]


def test_plot_without_matplotlib_is_skipped_with_a_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    why = report.write_plot(str(tmp_path / "p.png"), {}, [{"method": "lowrank"}])
    assert "matplotlib is not installed" in why
    assert not (tmp_path / "p.png").exists()


def test_json_turns_nan_into_null(tmp_path):
    meta = report.base_meta(torch.device("cpu"), True, argv=[])
    report.write_json(str(tmp_path / "x.json"), meta, [{"method": "dense", "median_ms": math.nan}])
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["rows"][0]["median_ms"] is None


# --------------------------------------------------------------------------------------------
# end-to-end mode
# --------------------------------------------------------------------------------------------

def test_swap_linears_touches_only_the_encoder_layers():
    model = nn.ModuleDict({
        "embed": nn.Linear(8, 8),
        "encoder": nn.ModuleDict({"layer": nn.ModuleList([nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8))])}),
    })
    names = swap_linears(model, lambda lin: LowRankLinear(lin.in_features, lin.out_features, 2))
    assert names == ["encoder.layer.0.0", "encoder.layer.0.1"]
    assert isinstance(model["embed"], nn.Linear)
    assert all(isinstance(m, LowRankLinear) for m in model["encoder"]["layer"][0])
    assert encoder_linear_filter("encoder.layer.3.attention.self.query", nn.Linear(2, 2))
    assert not encoder_linear_filter("pooler.dense", nn.Linear(2, 2))


def test_e2e_bert_base_small_mode_keeps_the_bert_base_layer_shapes():
    pytest.importorskip("transformers")
    from fastfactor.bench.e2e import build_model

    model = build_model("bert-base", small=True)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 768
    names = swap_linears(model, lambda lin: LowRankLinear(lin.in_features, lin.out_features, 4))
    assert len(names) == 2 * 6  # q, k, v, attention output, MLP up, MLP down
    shapes_ = sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, LowRankLinear)})
    assert shapes_ == [(768, 768), (768, 3072), (3072, 768)]


def test_e2e_small_mode_on_cpu_through_the_cli(tmp_path):
    """One model through the whole e2e path (MiniLM when bundled: pretrained and quick to load)."""
    pytest.importorskip("transformers")
    from fastfactor.bench.e2e import minilm_path

    model, layers = ("minilm", 6) if minilm_path() else ("bert-base", 2)
    rc, out = _bench(tmp_path, "--e2e", "--e2e-models", model, "--methods", "lowrank",
                     "--ratios", "0.25", "--batch", "1", "--seq-len", "8")
    assert rc == 0
    doc = json.loads((out / "r.json").read_text())
    assert doc["rows"] == [] and doc["meta"]["e2e"]["seq_len"] == 8 and doc["meta"]["cpu_figures"]
    assert not [m for m in doc["meta"]["messages"] if "failed" in m], doc["meta"]["messages"]
    rows = doc["e2e"]
    assert all(set(r) == set(report.E2E_FIELDS) for r in rows)
    assert [(r["model"], r["method"]) for r in rows] == [(model, "dense"), (model, "lowrank")]
    for r in rows:
        assert r["infer_ms"] > 0 and r["train_ms"] > 0 and r["cpu_figures"] is True
        assert r["train_tokens_per_s"] == pytest.approx(8 / (r["train_ms"] * 1e-3))
    dense, low = rows
    assert low["swapped_layers"] == layers * 6
    assert 0.2 < low["ratio"] <= 0.25 and low["model_params"] < dense["model_params"]
    assert low["infer_speedup_vs_dense"] == pytest.approx(dense["infer_ms"] / low["infer_ms"])
    assert low["train_speedup_vs_dense"] == pytest.approx(dense["train_ms"] / low["train_ms"])
    assert (out / "r-e2e.csv").exists()
