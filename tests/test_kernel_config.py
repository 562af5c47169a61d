"""The shared kernel infrastructure (``kernels/_config.py``): compile signatures derived from a
kernel's own arguments, the named configs of ``Tunable``, and the small helpers every family shares."""

import pytest
import torch

from fastfactor.kernels import _config as C

triton = pytest.importorskip("triton")


def test_signature_derives_from_the_kernel_arguments():
    """Pointers (``*_ptr``) follow the input dtype unless overridden; every other non-constexpr
    argument is an ``i32``; constexprs are left out; the kernel's argument order is kept. The
    expected dict is the one that used to be written out by hand for ``lowrank.gemm``."""
    from fastfactor.kernels import lowrank as K

    sig = C.kernel_signature(K._gemm_kernel, "bf16", {"ws_ptr": "fp32"})
    assert sig == {
        "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "bias_ptr": "*bf16", "ws_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32",
        "stride_cm": "i32", "stride_cn": "i32",
    }
    assert list(sig) == [n for n in K._gemm_kernel.arg_names if n in sig]
    spec = C.KERNELS["lowrank.gemm"]
    assert spec.signature("fp16") == C.kernel_signature(K._gemm_kernel, "fp16", {"ws_ptr": "fp32"})


def test_every_registered_kernel_has_a_derived_signature():
    """No registered kernel leaves an argument out of its signature (compile-check would refuse it)."""
    from fastfactor import compile_check

    kernels = compile_check._load_registry()
    assert {"lowrank.chain", "monarch.bgemm", "sparse24.ds_chain"} <= set(kernels)
    for name, spec in kernels.items():
        sig = spec.signature(spec.dtypes[0])
        plain = [n for n in spec.fn.arg_names if n not in C.constexpr_args(spec.fn)]
        assert list(sig) == plain, name
        assert all(v.startswith("*") == k.endswith("_ptr") for k, v in sig.items()), name


def test_signature_override_must_name_an_argument():
    from fastfactor.kernels import lowrank as K

    with pytest.raises(ValueError, match=r"\['nope_ptr'\] are not arguments of _gemm_kernel"):
        C.kernel_signature(K._gemm_kernel, "bf16", {"nope_ptr": "fp32"})


SPACE = [dict(BLOCK=16, num_warps=4, num_stages=2), dict(BLOCK=64, num_warps=4, num_stages=3),
         dict(BLOCK=128, num_warps=8, num_stages=3), dict(BLOCK=32, num_warps=4, num_stages=2)]


@triton.jit
def _noop(x_ptr, n, BLOCK: triton.language.constexpr):
    pass


def test_tunable_named_configs(monkeypatch):
    t = C.Tunable(_noop, SPACE, key=["n"], interpreter=SPACE[3], deterministic=SPACE[2])
    monkeypatch.setattr(C, "is_interpreter", lambda: False)
    cfg = t.fixed_config({"n": 5})
    assert cfg.kwargs == {"BLOCK": 128} and cfg.num_warps == 8 and cfg.num_stages == 3
    # pruned away: the next config of the space after it (wrapping around) that survives
    t.prune = lambda cands, named, **kw: [c for c in cands if c.kwargs["BLOCK"] != 128]
    assert t.fixed_config({"n": 5}).kwargs == {"BLOCK": 32}
    t.prune = lambda cands, named, **kw: [c for c in cands if c.kwargs["BLOCK"] < 32]
    assert t.fixed_config({"n": 5}).kwargs == {"BLOCK": 16}
    monkeypatch.setattr(C, "is_interpreter", lambda: True)
    t.prune = None
    assert t.fixed_config({"n": 5}).kwargs == {"BLOCK": 32}  # the interpreter's config
    assert [c.kwargs for c in C.configs(SPACE, SPACE[3])] == [{"BLOCK": 32}]


def test_tunable_defaults_and_bad_deterministic_config():
    t = C.Tunable(_noop, SPACE, key=["n"])
    assert t.interpreter is SPACE[0] and t.deterministic is SPACE[1]
    with pytest.raises(ValueError, match="deterministic config .* is not in the autotune space"):
        C.Tunable(_noop, SPACE, key=["n"], deterministic=dict(BLOCK=256))


def test_every_family_launcher_names_its_configs():
    from fastfactor.kernels import lowrank, monarch, sparse24

    tunables = [v for m in (lowrank, monarch, sparse24) for v in vars(m).values() if isinstance(v, C.Tunable)]
    # low-rank: chain, gemm, split-K reduce, row sums, decode, decode backward; monarch: chain, bgemm, rows,
    # rows split stage 1, rows with dw2's partials, wgrad, wgrad_pair; 2:4: prune, mm, dx, dvalues,
    # ds_chain, ds_rank_split, ds_roles, ds_bwd_dense, decode, decode on sparse tensor cores, split-K
    # reduce, expand, compress
    assert len(tunables) == 26
    for t in tunables:
        assert t.interpreter in t.space and t.deterministic in t.space
        if t in (lowrank._decode_tuned, lowrank._decode_bwd_tuned, sparse24._sp_decode_mma_tuned):
            # tiles chosen per shape (decode_tiles, mma_decode_plans), passed as constexprs
            assert set(t.interpreter) == {"num_warps", "num_stages"}
            continue
        rows = [k for k in ("BLOCK_M", "BLOCK_R") if k in t.interpreter]
        assert not rows or t.interpreter[rows[0]] == 16   # the 2:4 decode tiles are planned, not tuned


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (1000, 1024)])
def test_next_pow2(n, expected):
    assert C.next_pow2(n) == expected


def test_m_bucket_and_acc_dtype():
    assert [C.m_bucket(m) for m in (0, 1, 5, 64, 1 << 20)] == [1, 1, 8, 64, 1 << 16]
    assert C.acc_dtype(torch.float64) == torch.float64
    assert all(C.acc_dtype(d) == torch.float32 for d in (torch.float32, torch.float16, torch.bfloat16))


def test_interpreter_index_compat_squeezes_one_element_scalars(monkeypatch):
    """Triton 3.6's interpreter (the GPU image's) turns a scalar into an int by ``int()`` of a
    one-element 1-D array, which NumPy >= 2.4 refuses; the shim in ``kernels._config`` replaces its
    ``__index__`` by the squeezing form of Triton 3.9, once, and leaves an interpreter that squeezes."""
    import numpy as np

    pytest.importorskip("triton")
    from triton.runtime import interpreter as I

    from fastfactor.kernels import _config

    class Scope:
        def __init__(self):
            self.attrs = {}

        def set_attr(self, obj, name, value):
            self.attrs[name] = value

    def old_style(tensor, scope):                  # Triton 3.6's form
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class Handle:
        data = np.array([7], dtype=np.int32)        # how the interpreter holds a scalar

    class T:
        handle = Handle()

    monkeypatch.setattr(I, "_patch_lang_tensor", old_style)
    assert _config._interpreter_index_compat() is True
    scope = Scope()
    I._patch_lang_tensor(object, scope)
    assert scope.attrs["__index__"](T()) == 7 and isinstance(scope.attrs["__index__"](T()), int)
    assert _config._interpreter_index_compat() is False          # already patched: once only

    def new_style(tensor, scope):                   # Triton 3.9's form: left alone
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(I, "_patch_lang_tensor", new_style)
    assert _config._interpreter_index_compat() is False and I._patch_lang_tensor is new_style
