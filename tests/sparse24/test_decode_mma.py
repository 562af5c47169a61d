"""Tier 1 (cpu): the 2:4 decode on sparse tensor cores (``_sp_decode_mma_kernel``, ``mma.sp``)
through the interpreter, where each ``mma.sp`` is emulated from the lanes' fragment registers as
PTX lays them out (so the loads' fragment bookkeeping, the K permutation and the codes' fragment
order are what is checked here; the instruction itself runs on a GPU: ``make gpu-check``):
float64 oracle for every row tile and split, fp16 and bf16, bias on/off, odd shapes, strided ``x``,
bitwise determinism, the codes' fragment order against a direct loop, the dispatch, and the issue
model against fresh sm_90 builds."""

import pytest
import torch

from conftest import assert_close_ref, sparse24_case, sparse24_ref64
from fastfactor.formats.sparse24 import Sparse24Weight, pack_24, prune_24
from fastfactor.kernels import _config
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
            f = K.MMA_DECODE_ISSUE[(cx["BLOCK_N"], cx["NT"])]
            want = f["step_split" if cx["SPLIT"] else "step"]
            assert abs(r["loop_instructions"] - want) <= 0.1 * want, (tag, r["loop_instructions"], want)
