"""Speed rows of the modules compressed together: ``fastfactor sol --joint`` (predicted) and
``fastfactor bench --joint`` (measured; CPU figures here)."""

import pytest
import torch

from fastfactor.factorize.svd import rank_for_ratio
from fastfactor.kernels import _config
from fastfactor.sol.joint import MEMBERS, joint_rank


@pytest.mark.parametrize("k,n", [(384, 384), (384, 1536), (4096, 1024), (37, 11)])
@pytest.mark.parametrize("g", [2, 3])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7])
def test_joint_rank_same_budget(k, n, g, ratio):
    rs, r = joint_rank(k, n, g, ratio)
    assert rs == rank_for_ratio(k, n, ratio)
    sep = g * rs * (k + n)
    assert r * (k + g * n) <= sep and (r == min(k, g * n) or (r + 1) * (k + g * n) > sep)


@pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")
def test_sol_joint_rows_one_launch_for_the_group(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_SOL_CACHE", str(tmp_path / "solcache"))
    from fastfactor.sol.device import get_device
    from fastfactor.sol.joint import joint_rows
    from fastfactor.sol.rows import RowSpec, evaluate_row

    dev = get_device("h200")
    spec = RowSpec("lowrank", 96, 96, 4096, 0.5, "fwd")
    row = evaluate_row(spec, dev, configs="fixed")
    (j,) = joint_rows([(spec, row)], "qkv", dev, configs="fixed")
    assert j["status"] == "predicted, not measured"
    assert j["launches_separate"] == 3 * row["launches"] and j["launches_joint"] == row["launches"]
    assert j["params_joint"] <= j["params_separate"] and j["rank_joint"] == joint_rank(96, 96, 3, 0.5)[1]
    assert j["separate_ms"] == pytest.approx(3 * row["predicted_ms"])
    assert j["joint_ms"] < j["separate_ms"]  # x read once, one launch
    with pytest.raises(ValueError, match="joint: expected"):
        joint_rows([(spec, row)], "kqv", dev)


def test_bench_joint_rows_cpu(capsys):
    from fastfactor.cli import main

    rc = main(["bench", "--methods", "lowrank", "--ratios", "0.5", "--shapes", "40x24", "--tokens", "9",
               "--directions", "fwd", "--joint", "mlp", "--quiet", "--rep-ms", "2", "--warmup-ms", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "modules compressed together (mlp)" in out and "40x2*24" in out


def test_bench_joint_members_are_the_joint_layer():
    from fastfactor.bench.joint import joint_bench_rows
    from fastfactor.bench.runner import BenchConfig
    from fastfactor.bench.shapes import parse_shapes

    cfg = BenchConfig(methods=("lowrank",), shapes=tuple(parse_shapes("33x17")), tokens=(5,), dtypes=(torch.float32,),
                      directions=("fwd",), params={"lowrank": (0.3,)}, warmup_ms=1, rep_ms=1)
    (row,) = joint_bench_rows(cfg, "qkv", log=lambda m: None)
    assert row["rank_joint"] == joint_rank(33, 17, 3, 0.3)[1] and row["separate_ms"] > 0 and row["joint_ms"] > 0
    assert set(MEMBERS) == {"qkv", "mlp"}
