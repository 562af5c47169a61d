"""``fastfactor sol``: the launch recorder, the exact interpreter counts (scaled per program class
and sampled loops against full runs), the model's arithmetic, and the command."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastfactor.kernels import _config

pytestmark = pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACTOR_SOL_CACHE", str(tmp_path / "solcache"))


def _launches(method, k, n, m, param, direction="fwd+bwd"):
    from fastfactor.sol import record as R
    from fastfactor.sol.rows import RowSpec, build_module

    mod = build_module(RowSpec(method, k, n, m, param))
    x = torch.randn(m, k).bfloat16()
    g = torch.randn(m, n).bfloat16()
    return R.record_launches(mod, x, g, direction)


FIELDS = ("load_bytes", "store_bytes", "load_sectors", "store_sectors", "unique_bytes")


# sizes whose rows are whole 32-byte sectors (sector counts are then the same in every program of a
# class); the odd low-rank case checks bytes, FLOPs and unique bytes only
@pytest.mark.parametrize("method,k,n,m,param,sectors,path", [
    ("lowrank", 200, 136, 70, 0.25, False, "fused"),
    ("lowrank", 256, 128, 80, 0.125, True, "fused"),
    ("lowrank", 256, 192, 24, 0.5, True, "two_gemm"),
    ("monarch", 128, 256, 48, 4, True, ""),
    ("sparse24", 128, 192, 40, None, True, ""),
    ("dense_sparse", 128, 96, 33, 0.25, True, ""),
])
def test_scaled_counts_equal_full_counts(method, k, n, m, param, sectors, path, monkeypatch):
    from fastfactor.sol import count as C

    if path:
        monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", path)
    launches = _launches(method, k, n, m, param)
    assert launches, "no launch recorded"
    for launch in launches:
        cfg = launch.candidates[0]
        full = C.count_launch(launch, cfg, "full")
        scaled = C.count_launch(launch, cfg, "scaled")
        assert scaled.programs == full.programs
        assert scaled.dot_flops == full.dot_flops, launch.kernel
        for name in full.tensors:
            for f in FIELDS if sectors else ("load_bytes", "store_bytes", "unique_bytes"):
                a, b = getattr(scaled.tensors[name], f), getattr(full.tensors[name], f)
                assert a == b, f"{launch.kernel} ({launch.phase}) {name}.{f}: scaled {a} != full {b}"


def test_gemm_counts_by_hand():
    """A (M, K)·(K, N) GEMM with 16-tiles: A is read once per column tile, B once per row tile,
    C written once, 2·M·N·K FLOPs; with M = 40 the last row tile is masked (not counted)."""
    from fastfactor.kernels import lowrank as K
    from fastfactor.sol import count as C
    from fastfactor.sol import record as R

    M, Kd, N = 40, 64, 48
    a, b = torch.randn(M, Kd).bfloat16(), torch.randn(Kd, N).bfloat16()
    with R.recording() as rec:
        K.gemm(a, b, splits=1)
    (launch,) = rec.launches
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    c = C.count_launch(launch, cfg, "scaled")
    assert c.programs == 3 * 3
    assert c.tensors["a_ptr"].load_bytes == M * Kd * 2 * (N // 16)
    assert c.tensors["b_ptr"].load_bytes == Kd * N * 2 * 3
    (cname,) = [n for n in c.tensors if n.startswith("c_ptr")]
    assert c.tensors[cname].store_bytes == M * N * 2
    assert c.dot_flops == 2 * 48 * N * Kd  # 3 row tiles of 16 issued, padding included
    assert c.tensors["a_ptr"].reread == N // 16
    assert c.reduction == Kd


def test_recorder_runs_nothing_and_records_the_specialization(monkeypatch):
    from fastfactor.sol import record as R

    monkeypatch.setenv("FASTFACTOR_LOWRANK_PATH", "two_gemm")
    from fastfactor.sol.rows import RowSpec, build_module

    mod = build_module(RowSpec("lowrank", 4096, 4096, 16, 0.25))  # r = 512 > 256: two GEMMs
    x = torch.empty(16, 4096, dtype=torch.bfloat16)
    g = torch.empty(16, 4096, dtype=torch.bfloat16)
    fwd = R.record_launches(mod, x, g, "fwd")
    assert [l.kernel for l in fwd if l.kernel == "lowrank.gemm"] == ["lowrank.gemm", "lowrank.gemm"]
    spz = fwd[0].specialization()
    assert spz["M"] == "1" or spz["M"] == "D"  # 16: divisible
    assert spz["stride_bk"] == "1"  # v.t(): unit stride along the reduction
    assert spz["K"] == "D" and spz["a_ptr"] == "D"
    both = R.record_launches(mod, x, g, "fwd+bwd")
    assert [l.phase for l in both].count("bwd") >= 3
    bwd = R.record_launches(mod, x, g, "bwd")
    assert all(l.phase == "bwd" for l in bwd) and len(bwd) == len(both) - len(fwd)
    # the candidates are the GPU autotune space after pruning, the fixed config one of them
    assert len(fwd[0].candidates) > 1 and fwd[0].fixed in fwd[0].candidates


def test_torch_ops_recorded_without_compute():
    from fastfactor.sol import record as R

    w = torch.empty(300, 200, requires_grad=True)
    x = torch.empty(50, 200)
    g = torch.empty(50, 300)
    ops = R.record_torch_ops(lambda t: torch.nn.functional.linear(t, w), x, g, [w], "fwd+bwd")
    mms = [o for o in ops if o.name == "mm"]
    assert len(mms) == 3  # forward, dx, dW
    assert ops[0].phase == "fwd" and mms[-1].phase == "bwd"


def test_model_terms():
    from fastfactor.sol import model
    from fastfactor.sol.device import H200

    assert model.fill(66, H200) == (1, 0.5)
    waves, f = model.fill(133, H200)
    assert waves == 2 and abs(f - 133 / 264) < 1e-12
    # dense F.linear fwd at M = 16384, 4096², bf16: matmul-bound, 2·M·K·N / rate + launch
    from fastfactor.sol import record as R

    w = torch.empty(4096, 4096, dtype=torch.bfloat16)
    ops = R.record_torch_ops(lambda t: torch.nn.functional.linear(t, w), torch.empty(16384, 4096, dtype=torch.bfloat16),
                             torch.empty(16384, 4096, dtype=torch.bfloat16), [], "fwd")
    t = model.torch_path_time(ops, H200)
    want = 2 * 16384 * 4096 * 4096 / H200.bf16_rate + H200.launch_s
    assert abs(t["seconds"] - want) / want < 1e-9


def test_evaluate_row_and_budgets(monkeypatch):
    from fastfactor.kernels import monarch as Mk
    from fastfactor.sol import budgets as B
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    monkeypatch.setenv("FASTFACTOR_MONARCH_KSPLIT", "0")
    row = evaluate_row(RowSpec("monarch", 256, 256, 32, 4, "fwd"), H200, configs="fixed")
    assert row["status"] == "predicted, not measured"
    assert row["predicted_ms"] > 0 and row["dense_ms"] > 0 and row["unfused_ms"] > 0
    assert row["useful_flops"] == 2 * 32 * 4 * 1 * (256 + 256)  # 2·M·b·r·(K + N), rank 1
    # the row-block kernel packs the b = 4 rank-1 blocks into one 16-wide dot: 16 / (b·r) = 4x,
    # and at 32 rows its output tiles are split over 2 programs that each redo stage 1: 6x
    assert 4 * row["useful_flops"] <= row["issued_flops"] <= 6 * row["useful_flops"]
    # with stage 1's reduction split as well (the planner's choice at this size): the OS output
    # splits still redo stage 1, each over KS programs, and nothing else is added
    monkeypatch.delenv("FASTFACTOR_MONARCH_KSPLIT")
    split = evaluate_row(RowSpec("monarch", 256, 256, 32, 4, "fwd"), H200, configs="fixed")
    bm, bn, os_, ks, _ = Mk.rows_ksplit(32, 256, 256, 4, 1, sms=H200.sms)
    rows_ = Mk.cdiv(32, bm) * bm
    assert split["issued_flops"] == 2 * rows_ * 256 * 16 * (os_ + 1)
    assert split["predicted_ms"] < row["predicted_ms"]
    for name in ("reread", "fill", "access", "flops"):
        ok, fig, tgt = B.check(name, row, H200)
        assert isinstance(ok, bool) and fig and tgt
    with pytest.raises(ValueError, match="budget"):
        B.check("nope", row, H200)
    with pytest.raises(ValueError, match="direction"):
        evaluate_row(RowSpec("monarch", 256, 256, 32, 4, "sideways"), H200)


def test_cli_json(tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command re-executes itself
    p = subprocess.run([sys.executable, "-m", "fastfactor.cli", "sol", "--methods", "monarch", "--shapes", "96x160",
                        "--tokens", "24", "--nblocks", "4", "--directions", "fwd", "--configs", "fixed",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "predicted, not measured" in p.stdout
    d = json.loads(out.read_text())
    assert d["meta"]["status"] == "predicted, not measured"
    (row,) = d["rows"]
    assert row["method"] == "monarch" and row["tokens"] == 24 and row["detail"]
    bad = subprocess.run([sys.executable, "-m", "fastfactor.cli", "sol", "--methods", "lowrank"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "expected --preset" in bad.stderr


def test_sass_counts_and_occupancy():
    from fastfactor.sol import sass as S

    text = """
        /*0070*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0080*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*00a0*/                   STL [R1+0x4], R6 ;
        /*00b0*/                   LDL R7, [R1+0x4] ;
        /*00c0*/                   STG.E.U16 desc[UR4][R10.64], R7 ;
        /*00d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
    """
    c = S.sass_counts(text)
    assert (c["ldg128"], c["ldg_u16"], c["hgmma"], c["hmma"], c["stl"], c["ldl"], c["stg_u16"], c["bar"]) == \
        (1, 1, 1, 0, 1, 1, 1, 1)
    assert c["instructions"] == 7
    # 255 registers x 256 threads: one program per SM; 32 regs x 128 threads, 1 KiB smem: 16 (warp limit)
    assert S.occupancy(255, 49152, 8) == 1
    assert S.occupancy(32, 1024, 4) == 16
    assert S.occupancy(64, 120 * 1024, 4) == 1  # shared memory bound


def test_compile_check_builds_the_recorded_specializations(tmp_path):
    """``compile-check --from-sol``: the runtime specializations a sol JSON recorded, compiled for
    sm_90 with their SASS read (registers, HGMMA/HMMA, loads)."""
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTFACTOR_SOL_CACHE"] = str(tmp_path / "cache")
    p = subprocess.run([sys.executable, "-m", "fastfactor.cli", "sol", "--methods", "monarch", "--shapes", "128x256",
                        "--tokens", "64", "--nblocks", "4", "--directions", "fwd", "--configs", "fixed",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    c = subprocess.run([sys.executable, "-m", "fastfactor.cli", "compile-check", "--from-sol", str(out),
                        "--targets", "sm90"], capture_output=True, text=True, env=env, timeout=900)
    assert c.returncode == 0, c.stdout + c.stderr
    assert "0 failed (runtime specializations)" in c.stdout
    rows = [l for l in c.stdout.splitlines() if l.startswith("monarch.")]
    assert rows and all(" sm90 " in l and "regs=" in l and "regs=None" not in l for l in rows)


def test_loop_split_reads_the_mma_loop():
    from fastfactor.sol import sass as S

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   IADD3 R8, R8, 0x1, RZ ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R4, R6, R12 ;
        /*0050*/              @P0 BRA 0x20 ;
        /*0060*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0070*/              @P1 BRA 0x60 ;
        /*0080*/                   STG.E.128 desc[UR4][R10.64], R12 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
        /*00b0*/                   NOP;
    """
    c = S.loop_split(text)
    # the loop 0x20..0x50 holds the HMMA (4 instructions); the rest, without the NOP and the
    # closing self-branch: 0x00, 0x10, 0x60, 0x70, 0x80, 0x90
    assert (c["loop_instructions"], c["outside_instructions"], c["loop_range"]) == (4, 6, [0x20, 0x50])
    assert S.loop_split("        /*0000*/   EXIT ;\n")["loop_instructions"] == 0


def test_issue_term_by_hand_and_missing_sass():
    """The instruction-issue term of one small recorded launch, computed by hand, equals the
    model's; the row's bound becomes the max of the terms; a launch without SASS facts says so."""
    import copy
    import math

    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, apply_issue_terms, evaluate_row

    row = evaluate_row(RowSpec("monarch", 256, 256, 32, 4, "fwd"), H200, configs="fixed")
    assert row["detail"]
    base = copy.deepcopy(row)
    apply_issue_terms(row, H200)  # no e['sass']: nothing changes, every launch says why
    assert row["predicted_ms"] == pytest.approx(base["predicted_ms"])
    for e in row["detail"]:
        assert e["issue"]["seconds"] is None and "not computed" in e["issue"]["note"]
        assert "issue" not in e["terms"]

    row = copy.deepcopy(base)
    e = row["detail"][0]
    cfg = e["config"]
    loop, outside = 5000, 700  # large enough that issue binds
    e["sass"] = dict(loop_instructions=loop, outside_instructions=outside)
    for other in row["detail"][1:]:
        other["sass"] = {"error": "RuntimeError: no build"}
    apply_issue_terms(row, H200)
    step = cfg.get("BLOCK_K") or cfg.get("BLOCK_R")
    trips = math.ceil(e["reduction"] / step)
    programs = math.prod(e["grid"])
    waves = math.ceil(programs / 132)
    busy = min(1.0, programs / (waves * 132))
    hand = programs * cfg["num_warps"] * (outside + loop * trips) / (132 * 4 * 1.98e9 * busy)
    assert e["issue"]["seconds"] == pytest.approx(hand, rel=1e-12)
    assert e["terms"]["issue"] == pytest.approx(hand, rel=1e-12)
    assert e["bound"] == "issue" and e["seconds"] == pytest.approx(hand + H200.launch_s)
    assert "issue" in row["bound"]
    for other in row["detail"][1:]:
        assert other["issue"]["seconds"] is None and "build failed" in other["issue"]["note"]
    from fastfactor.sol.model import issue_term

    failed = issue_term(e, {"error": "RuntimeError: ptxas"}, H200)
    assert failed["seconds"] is None and "build failed" in failed["note"] and "not computed" in failed["note"]
    extra = (hand + H200.launch_s) - base["detail"][0]["seconds"]
    assert row["predicted_ms"] == pytest.approx(base["predicted_ms"] + extra * 1e3)
    assert row["speedup_vs_dense"] == pytest.approx(row["dense_ms"] / row["predicted_ms"])


def test_expansion_budget_by_hand():
    """The 2:4 expansion budget: main-loop instructions of the compiled build over the weights a
    warp expands in a step (BLOCK_N·BLOCK_K / num_warps); the widest of the row's decode launches."""
    from fastfactor.sol import budgets as B
    from fastfactor.sol.device import H200

    def launch(loop, bn=128, bk=128, nw=8, kernel="sparse24.decode"):
        return dict(kernel=kernel, config_label="x", constexprs=dict(BLOCK_N=bn),
                    config=dict(BLOCK_K=bk, num_warps=nw), sass=dict(loop_instructions=loop))

    ok, fig, tgt = B.check("expansion", dict(detail=[launch(259)]), H200)
    assert not ok and fig.startswith("0.126 ") and tgt == "<= 0.05 a weight"       # 259 / 2048
    assert B.check("expansion", dict(detail=[launch(100)]), H200)[0]                 # 0.049
    assert not B.check("expansion", dict(detail=[launch(100), launch(100, bn=32, nw=4)]), H200)[0]
    assert B.check("expansion", dict(detail=[launch(166)]), H200, limit=0.09)[0]     # 0.081
    # nothing to judge is a failure, not a pass
    assert not B.check("expansion", dict(detail=[launch(100, kernel="sparse24.dx_decode")]), H200)[0]
    assert not B.check("expansion", dict(detail=[dict(launch(0), sass=dict(loop_instructions=0))]), H200)[0]
