"""Tier 1 (cpu): the 2:4 decode on sparse tensor cores (``_sp_decode_mma_kernel``, ``mma.sp``)
through the interpreter, where each ``mma.sp`` is emulated from the lanes' fragment registers as
PTX lays them out (so the loads' fragment bookkeeping, the K permutation and the codes' fragment
order are what is checked here; the instruction itself runs on a GPU: ``make gpu-check``):
float64 oracle for every row tile and split, fp16 and bf16, bias on/off, odd shapes, strided ``x``,
bitwise determinism, the codes' fragment order against a direct loop, the dispatch, and the issue
model against fresh sm_90 builds."""

import pytest
import torch

from conftest import assert_close_ref, sol_counts_scaled_and_full, sparse24_case, sparse24_ref64
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import _config, _cost
from fastfactor.kernels import sparse24 as K
from fastfactor.ops import sparse24 as ops

DT_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


_case = sparse24_case
_ref64 = sparse24_ref64


# (M, N, K, plan): every row tile (1, 2, 4, 8 warps; 1 or 2 tiles of 16 rows a warp), one and two
# 8-token tiles, splits (one with a short last split), N not a multiple of the row tile
CASES = [
    (1, 48, 64, (16, 1)),
    (5, 64, 128, (64, 1)),
    (8, 96, 192, (32, 3)),
    (9, 48, 320, (16, 2)),        # 320 = 2 x 192 - 64: the last split is one step short
    (12, 160, 256, (128, 2)),     # 160 rows: the second program's tiles past N are not stored
    (16, 256, 128, (256, 1)),
    (16, 128, 512, (128, 4)),
    (3, 272, 64, (256, 1)),
]


@pytest.mark.parametrize("case", [c + (i % 2 == 0, dt) for i, c in enumerate(CASES)
                                  for dt in (torch.bfloat16, torch.float16)],
                         ids=lambda c: (f"M{c[0]}-N{c[1]}-K{c[2]}-bn{c[3][0]}-sk{c[3][1]}-"
                                        f"{'bias' if c[4] else 'nobias'}-{DT_IDS[c[5]]}"))
def test_mma_decode_matches_float64(triton_cpu, case):
    m, n, k, plan, bias, dtype = case
    x, values, meta, b = _case(m, n, k, dtype)
    b = b if bias else None
    assert K.mma_decode_ok(x, values)
    y = K.sparse24_decode_mma(x, values, meta, b, plan=plan)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_ref(y, _ref64(x, values, meta, b), dtype, reduction=k)


def test_mma_decode_strided_x_deterministic_and_split_consistent(triton_cpu):
    x, values, meta, b = _case(11, 64, 512, torch.bfloat16, seed=3)
    xs = torch.zeros(11, 640, dtype=x.dtype)[:, 64:576]
    xs.copy_(x)                                                  # rows 640 apart, 128-byte offset
    assert xs.stride(0) == 640 and K.mma_decode_ok(xs, values)
    a = K.sparse24_decode_mma(xs, values, meta, b, plan=(32, 4))
    assert torch.equal(a, K.sparse24_decode_mma(xs, values, meta, b, plan=(32, 4)))
    one = K.sparse24_decode_mma(x, values, meta, b, plan=(32, 1))
    ref = _ref64(x, values, meta, b)
    assert_close_ref(a, ref, torch.bfloat16, reduction=512)
    assert_close_ref(one, ref, torch.bfloat16, reduction=512)


@pytest.mark.parametrize("m,n,k,plan,dropped", [
    (12, 160, 256, (128, 2), True),    # the second tile's lines past N belong to the next token row: kept
    (9, 96, 384, (32, 3), True),
    (7, 64, 512, (64, 4), True),
    (9, 48, 320, (16, 2), False),      # 16-row tiles fill half a 128-byte line: nothing dropped
])
def test_split_partials_dropped_from_l2_once_each(triton_cpu, monkeypatch, m, n, k, plan, dropped):
    """The reducer drops the summed partials from L2 (``discard.global.L2``; under the interpreter
    each dropped line's elements are counted in a shadow of the workspace): every partial of every
    split exactly once, nothing else, and only where a tile's partials fill whole lines; the result
    is bitwise the same with the drop turned off (``FASTFACTOR_SPLIT_DISCARD=0``)."""
    from fastfactor.kernels import _split

    seen = []

    def spy(ws, mode):
        t = _split.discard_target(ws, mode)
        seen.append((mode, ws, t))
        return t

    monkeypatch.setattr(K, "discard_target", spy)
    x, values, meta, b = _case(m, n, k, torch.bfloat16, seed=5)
    y = K.sparse24_decode_mma(x, values, meta, b, plan=plan)
    assert_close_ref(y, _ref64(x, values, meta, b), torch.bfloat16, reduction=k)
    ((mode, ws, shadow),) = seen
    assert ws.shape == (plan[1], m, n)
    if dropped:
        assert mode == 1 and shadow is not ws
        assert torch.equal(shadow, torch.ones_like(shadow))           # each partial once, no other line
    else:
        assert mode == 0 and shadow is ws
    monkeypatch.setenv("FASTFACTOR_SPLIT_DISCARD", "0")
    seen.clear()
    assert torch.equal(K.sparse24_decode_mma(x, values, meta, b, plan=plan), y)
    assert seen[0][0] == 0 and seen[0][2] is seen[0][1]
    monkeypatch.setenv("FASTFACTOR_SPLIT_DISCARD", "yes")
    with pytest.raises(ValueError, match="FASTFACTOR_SPLIT_DISCARD.*'yes'"):
        K.sparse24_decode_mma(x, values, meta, b, plan=plan)


def test_discard_mode_and_the_planner_price_the_dropped_partials(monkeypatch):
    from fastfactor.kernels import _split

    ws = torch.empty(2, 3, 64)
    assert _split.discard_mode(False, True, ws) == 0 and _split.discard_mode(True, False, ws) == 0
    assert _split.discard_mode(True, True, ws) == 1                        # CPU: the interpreter's stand-in
    assert K.mma_whole_lines(4096, 128) and not K.mma_whole_lines(4096, 16) and not K.mma_whole_lines(48, 32)
    assert K.mma_discards(4096, 128, 4) and not K.mma_discards(4096, 128, 1)
    four, three = K.decode_launch_bytes(12, 4096, 4096, 128, 4), K.decode_launch_bytes(12, 4096, 4096, 128, 4, code_bits=3)
    assert four["dram"] - three["dram"] == 4096 * 4096 / 32 and four["l2"] - three["l2"] == 4096 * 4096 / 32
    kept = K.decode_launch_bytes(12, 4096, 4096, 128, 4)
    gone = K.decode_launch_bytes(12, 4096, 4096, 128, 4, discard=True)
    assert kept["dram"] - gone["dram"] == 4.0 * 4 * 12 * 4096 and kept["l2"] == gone["l2"]
    t_on = K.mma_decode_plan_cost(12, 4096, 4096, 132)
    monkeypatch.setenv("FASTFACTOR_SPLIT_DISCARD", "0")
    t_off = K.mma_decode_plan_cost(12, 4096, 4096, 132)                   # cached per flag
    assert t_on[0] < t_off[0]
    w0, tr0 = K.mma_decode_warp_instructions(128, 12, 1024, True)
    w1, tr1 = K.mma_decode_warp_instructions(128, 12, 1024, True, discard=True)
    assert tr1 == tr0 + [1] and w1 - w0 == 4 * K.MMA_DISCARD_ISSUE[128]


def test_fragment_codes_against_a_direct_loop():
    torch.manual_seed(1)
    n, k = 32, 128
    meta = pack_24(prune_24(torch.randn(n, k))).meta
    i0, i1 = K._codes(meta, k)
    code = (i0 | (i1 << 2)).tolist()
    frag = K.mma_frag_codes(meta, n, k)
    assert frag.shape == (n // 16, k // 64, 8, 2, 2) and frag.dtype == torch.int32
    for b in range(n // 16):
        for s in range(k // 64):
            for g in range(8):
                for p in range(2):
                    for c in range(2):
                        want = 0
                        for h in range(2):
                            for i in range(4):
                                grp = 16 * s + 4 * i + 2 * c + p          # the kernel's sigma(c, 4p + i)
                                want |= code[16 * b + g + 8 * h][grp] << (16 * h + 4 * i)
                        assert int(frag[b, s, g, p, c]) & 0xFFFFFFFF == want
    # cached on the codes (keyed by their version); a new mask makes new fragment codes
    assert K.mma_codes(meta, n, k) is K.mma_codes(meta, n, k)
    before = K.mma_codes(meta, n, k)
    meta[0, 0] = 0x84 if int(meta[0, 0]) != 0x84 else 0x94
    assert K.mma_codes(meta, n, k) is not before


def _codes3_decoded(c3: torch.Tensor) -> torch.Tensor:
    """What ``_codes3_words`` computes, in int64 arithmetic on 32-bit words: the four metadata
    words ``(b, p, g, t, r)`` of each lane from its three bit planes."""
    m32 = 0xFFFFFFFF
    w = c3.to(torch.int64) & m32
    b, p = w.shape[:2]
    s0, s1 = w[..., :32].reshape(b, p, 8, 2, 2).unbind(-1)
    s2 = w[..., 32:].reshape(b, p, 8, 2)

    def sel(m, a, c):
        return ((a ^ c) & m) ^ c

    t0, t1, t2, t3 = s2, s0 & s1, (~s0 & m32) | s1, s0 | s1
    u0 = sel(0x33333333, t0, (t2 << 2) & m32)
    u2 = sel(0x33333333, t0 >> 2, t2)
    u1 = sel(0x33333333, t1, (t3 << 2) & m32)
    u3 = sel(0x33333333, t1 >> 2, t3)
    return torch.stack((sel(0x55555555, u0, (u1 << 1) & m32), sel(0x55555555, u0 >> 1, u1),
                        sel(0x55555555, u2, (u3 << 1) & m32), sel(0x55555555, u2 >> 1, u3)), dim=-1)


def test_three_bit_codes_decode_to_the_fragment_codes():
    """The 3-bit codes (three bit planes for every four metadata words, ``mma_frag_codes3``) are
    three quarters of the bytes and decode, by the kernel's logic ops, to exactly the fragment
    codes; a pattern that is not 2:4 is refused; cached once per mask."""
    n, k = 48, 384
    x, values, meta, b = _case(4, n, k, torch.bfloat16, seed=7)
    c3 = K.mma_frag_codes3(meta, n, k)
    c4 = K.mma_frag_codes(meta, n, k)
    assert c3.shape == (n // 16, k // 128, 48) and c3.dtype == torch.int32 and 4 * c3.numel() == 3 * c4.numel()
    want = (c4.to(torch.int64) & 0xFFFFFFFF).reshape(n // 16, k // 128, 2, 8, 2, 2).permute(0, 1, 3, 4, 2, 5)
    assert torch.equal(_codes3_decoded(c3), want.reshape(n // 16, k // 128, 8, 2, 4))
    assert K.mma_codes3(meta, n, k) is K.mma_codes3(meta, n, k)
    bad = meta.clone()
    bad[0, 0] = 0x00                                     # i0 == i1: not two distinct kept positions
    with pytest.raises(ValueError, match="meta: expected 2:4 codes"):
        K.mma_frag_codes3(bad, n, k)
    assert K.mma_codes3_ok(128) and K.mma_codes3_ok(4096) and not K.mma_codes3_ok(192)


def test_three_bit_codes_bitwise_equal_to_four(triton_cpu, monkeypatch):
    """The kernel reading the 3-bit codes (two tiles a warp: lanes 2, 3 decode tile b's and hand
    them over) gives bitwise the result of the 4-bit codes (``FASTFACTOR_SPARSE24_CODES3=0``)."""
    for m, n, k, plan in ((16, 128, 512, (128, 2)), (5, 96, 256, (32, 1)), (12, 64, 384, (16, 3))):
        x, values, meta, b = _case(m, n, k, torch.float16, seed=m)
        monkeypatch.setenv("FASTFACTOR_SPARSE24_CODES3", "1")                  # wherever K % 128 == 0
        assert K.mma_uses_codes3(m, n, k, 132)
        y3 = K.sparse24_decode_mma(x, values, meta, b, plan=plan)
        monkeypatch.setenv("FASTFACTOR_SPARSE24_CODES3", "0")
        assert not K.mma_uses_codes3(m, n, k, 132)
        y4 = K.sparse24_decode_mma(x, values, meta, b, plan=plan)
        monkeypatch.delenv("FASTFACTOR_SPARSE24_CODES3")
        assert torch.equal(y3, y4), (m, n, k, plan)
        assert_close_ref(y3, _ref64(x, values, meta, b), torch.float16, reduction=k)


def test_three_bit_codes_taken_where_predicted_no_slower(monkeypatch):
    """The 3-bit codes save bytes but cost a wider step (two 64-input steps a trip, 128-input
    splits) and some logic: the shape takes them where its planned launch with them is predicted
    no slower than with the 4-bit codes, which is what it is priced at."""
    for m, n, k in ((12, 4096, 4096), (16, 4096, 4096), (16, 768, 768), (4, 3072, 768), (16, 768, 3072)):
        t3 = _cost.robust_pick(K.mma_decode_plans(m, n, k, 132, codes3=True))[0]
        t4 = _cost.robust_pick(K.mma_decode_plans(m, n, k, 132, codes3=False))[0]
        assert K.mma_uses_codes3(m, n, k, 132) == (t3 <= t4), (m, n, k)
        assert K.mma_decode_plan_cost(m, n, k, 132)[0] == min(t3, t4)
    assert K.mma_uses_codes3(12, 4096, 4096, 132) and not K.mma_uses_codes3(16, 768, 768, 132)
    assert not K.mma_uses_codes3(16, 768, 192, 132)                             # K % 128 != 0
    monkeypatch.setenv("FASTFACTOR_SPARSE24_CODES3", "1")
    assert K.mma_uses_codes3(16, 768, 768, 132)


def test_eligibility_and_dispatch(triton_cpu, monkeypatch):
    x, values, meta, b = _case(12, 64, 128, torch.bfloat16, seed=5)
    assert K.mma_decode_ok(x, values)
    assert not K.mma_decode_ok(x.float(), values.float())                       # fp32: 1:2 in PyTorch, not 2:4
    assert not K.mma_decode_ok(torch.randn(17, 128).to(x.dtype), values)        # more than 16 tokens
    assert not K.mma_decode_ok(x, values, out_dtype=torch.float32)              # fp32 output (dense-sparse t)
    v48, _ = pack_24(prune_24(torch.randn(40, 128))).values.to(x.dtype), None
    assert not K.mma_decode_ok(x, v48)                                          # N % 16
    assert not K.mma_decode_ok(torch.randn(12, 96).to(x.dtype), values[:, :48])  # K % 64
    assert not K.mma_decode_ok(torch.randn(12, 129).to(x.dtype)[:, 1:], values)  # odd x offset
    monkeypatch.setenv("FASTFACTOR_SPARSE24_MMA", "0")
    assert not K.mma_decode_ok(x, values) and not K.mma_decode_shape_ok(12, 64, 128)
    monkeypatch.delenv("FASTFACTOR_SPARSE24_MMA")
    # sparse24_decode takes it when eligible, predicted no slower and no plan is forced; the op
    # reaches it at 12 tokens
    calls = []
    real = K.sparse24_decode_mma
    monkeypatch.setattr(K, "sparse24_decode_mma", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv("FASTFACTOR_SPARSE24_PATH", raising=False)
    y = ops.sparse24_linear(x, Sparse24Weight(values, meta, (64, 128)), b)
    assert calls
    assert_close_ref(y, _ref64(x, values, meta, b), torch.bfloat16, reduction=128)
    calls.clear()
    K.sparse24_decode(x, values, meta, b, plan=(32, 1))                           # a forced plan: the expanding decode
    assert not calls


def test_mma_planner_and_seconds():
    # 12 tokens on 4096x4096: 128-row tiles (two 16-row tiles a warp) split 4 ways, DRAM-bound
    t, bn, sk = K.mma_decode_plan_cost(12, 4096, 4096, 132)
    assert (bn, sk) == (128, 4)
    assert K.decode_seconds(12, 4096, 4096, 132) == t
    # the dispatch takes whichever decode the planners price lower (never slower on the model):
    # the sparse tensor cores at the BERT-size layers' 16 tokens, where the expanding decode's loop
    # is issue-bound
    for m, n, k in ((1, 4096, 4096), (16, 768, 768), (8, 3072, 768), (16, 768, 3072), (16, 3072, 768)):
        t_mma, t_old = K.mma_decode_plan_cost(m, n, k, 132)[0], K.decode_plan_cost(m, n, k, 132)[0]
        assert K.decode_seconds(m, n, k, 132) == min(t_mma, t_old)
        assert K.mma_decode_wins(m, n, k, 132) == (t_mma <= t_old)
    assert K.mma_decode_wins(16, 768, 768, 132) and K.mma_decode_wins(12, 4096, 4096, 132)
    # fp16 t of the dense-sparse product stays fp32: priced (and launched) as the expanding decode
    assert K.decode_seconds(12, 4096, 4096, 132, same_dtype=False) == K.decode_plan_cost(12, 4096, 4096, 132)[0]
    w, trips = K.mma_decode_warp_instructions(128, 12, 1024, True)
    assert trips == [16, 1] and w == 4 * (16 * K.MMA_DECODE_ISSUE[(128, 2)]["step_split"]
                                          + K.MMA_DECODE_ISSUE[(128, 2)]["program_split"])


@pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1")
def test_issue_model_and_sass_of_the_m12_launch():
    """The launch ``fastfactor sol`` records at 4096x4096, 12 tokens: recorded as a GPU runs it
    (``MMA == 2``), its compiled sm_90 build issues ``mma.sp`` (``HMMA.SP``), neither spills nor
    loses its 16-byte vector loads, and its main loop is the model's within 10 %; the launch is
    bound by its DRAM bytes."""
    from fastfactor.sol import budgets
    from fastfactor.sol import model as SM
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import RowSpec, evaluate_row

    row = evaluate_row(RowSpec("sparse24", 4096, 4096, 12, None, "fwd"), H200)
    budgets.attach_sass(row)
    (e,) = [e for e in row["detail"] if e["kernel"] == "sparse24.decode_mma"]
    assert e["constexprs"]["MMA"] == 2 and e["constexprs"]["BLOCK_N"] == 128
    f = e["sass"]
    assert "error" not in f, f
    assert f["stl"] == 0 and f["ldl"] == 0 and f["ldg128"] > 0 and not f.get("stg_u16")
    model_w = e["issue"]["warp_instructions"]
    it = SM.issue_term(e, f, H200)
    assert 0.9 * it["warp_instructions"] <= model_w <= 1.1 * it["warp_instructions"], (model_w, it)
    assert e["bound"] == "dram", (e["bound"], e["terms"])
    ok, figure, _ = budgets.expansion(row, H200)
    assert ok, figure


@pytest.mark.slow
def test_every_build_issues_sparse_mma_without_spills():
    """Every compile-tier build of the kernel (sm_80 and sm_90, bf16 and fp16): ``HMMA.SP`` in
    the SASS, no local memory, and the sm_90 main loops within 10 % of :data:`MMA_DECODE_ISSUE`."""
    import hashlib
    import inspect

    from fastfactor.sol import sass as S

    spec = _config.KERNELS["sparse24.decode_mma"]
    src = hashlib.sha256(inspect.getsource(K).encode()).hexdigest()[:16] + "-hmma_sp"
    jobs = []
    for cx in spec.constexprs:
        for dt in spec.dtypes:
            for arch in (80, 90):
                sig = spec.signature(dt)
                jobs.append(dict(kernel="sparse24.decode_mma", signature=sig, constexprs=cx,
                                 specialization={n: "D" for n in sig}, config=K.mma_space(**cx)[0], arch=arch,
                                 src=src))
    for job, r in zip(jobs, S.read_launches(jobs)):    # compiled in a child process, cached on disk
        cx, tag = job["constexprs"], (job["constexprs"], job["signature"]["x_ptr"], job["arch"])
        assert "error" not in r, (tag, r)
        assert r["stl"] == 0 and r["ldl"] == 0 and not r.get("spill"), (tag, r)
        assert r["hmma_sp"] > 0 and r["hgmma"] == 0, tag                         # mma.sp, nothing expanded
        if job["arch"] == 90:
            f = (K.MMA3_DECODE_ISSUE if cx["CODES3"] else K.MMA_DECODE_ISSUE)[(cx["BLOCK_N"], cx["NT"])]
            want = f["step_split" if cx["SPLIT"] else "step"]
            assert abs(r["loop_instructions"] - want) <= 0.1 * want, (tag, r["loop_instructions"], want)


@pytest.mark.parametrize("discard", [True, False])
def test_sol_counts_scaled_equal_full_and_dropped_partials_cost_no_dram(triton_cpu, monkeypatch, discard):
    """``fastfactor sol``'s counts of a split launch: one program per class (the tiles by split,
    the last split the reducer under the interpreter) equal every program's; the model prices the
    workspace at its stores only, or at no DRAM bytes where the reducer drops it (the discard
    target then its own tensor, costing nothing)."""
    from fastfactor.sol import model
    from fastfactor.sol import record as R
    from fastfactor.sol.device import H200

    if not discard:
        monkeypatch.setenv("FASTFACTOR_SPLIT_DISCARD", "0")
    x, values, meta, b = _case(12, 96, 768, torch.bfloat16, seed=4)
    with R.recording() as rec:
        K.sparse24_decode_mma(x, values, meta, b, plan=(32, 3))
    (launch,) = rec.launches
    assert launch.kernel == "sparse24.decode_mma" and launch.constexprs["DISCARD"] == (1 if discard else 0)
    scaled, full = sol_counts_scaled_and_full(launch, 3 * 3)
    ws = next(v for n, v in full.tensors.items() if n.startswith("ws_ptr"))
    assert ws.store_bytes == ws.load_bytes == 3 * 12 * 96 * 4
    assert ("wsd_ptr" in full.tensors) == discard
    t = model.launch_time(scaled, H200)
    expect = sum((0.0 if discard else tc.store_bytes) if n.startswith("ws_ptr") else
                 (min(tc.unique_bytes, tc.load_bytes) + tc.store_bytes)
                 for n, tc in scaled.tensors.items() if n != "wsd_ptr")
    assert t["dram_bytes"] == pytest.approx(expect)
