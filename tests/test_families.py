"""One declaration per family (fastfactor.families): what derives from it, the one from_linear
contract, and families / inits registered by user code and selected from a CompressionConfig."""

import dataclasses
import pathlib

import pytest
import torch
from torch import nn

import fastfactor
import fastfactor.compress as C
from fastfactor import families as F
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.layers import LowRankLinear
from fastfactor.factorize.svd import svd_factors
from fastfactor.layers.base import FactorizedLinear

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BUILTIN = ("lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse")


@pytest.fixture
def registry(monkeypatch):
    """Restores the family registry after the test (entries are replaced, never mutated)."""
    saved = dict(F.FAMILIES)
    yield F
    F.FAMILIES.clear()
    F.FAMILIES.update(saved)


def test_builtin_families_and_derived_views():
    assert tuple(F.FAMILIES)[:5] == BUILTIN
    assert tuple(C.METHODS)[:5] == BUILTIN and "lowrank" in C.METHODS
    assert C.INITS["lowrank"] == ("svd", "fisher", "activation")
    assert C.INITS["dense_sparse"] == ("svd_als", "svd")
    for f in F.FAMILIES.values():
        assert f.layer.method == f.name and issubclass(f.layer, FactorizedLinear)
        assert f.kernels is not None and f.kernels.__name__.startswith("fastfactor.kernels.")
        assert all(set(i.needs) <= set(F.STATISTICS) for i in f.inits)
    assert F.FAMILIES["lowrank"].needs == {"svd": (), "fisher": ("fisher",), "activation": ("gram",)}
    assert F.layer_classes()["DenseSparseLinear"] is fastfactor.DenseSparseLinear
    from fastfactor.bench import families as B
    from fastfactor.compress import evidence

    assert B.FAMILIES is F.FAMILIES and tuple(evidence.METHODS)[:5] == BUILTIN


def test_readme_method_table_is_generated_from_the_declarations():
    assert F.markdown_table() in README.read_text(encoding="utf-8")


def test_compile_check_kernels_come_from_the_families():
    from fastfactor import compile_check

    names = set(compile_check._load_registry())
    for f in F.FAMILIES.values():
        prefix = f.kernels.__name__.rsplit(".", 1)[-1] + "."
        assert any(n.startswith(prefix) for n in names), f.name


@pytest.mark.parametrize("method", BUILTIN)
def test_one_from_linear_contract(method):
    """Every layer takes ``rank=`` or ``ratio=``, exactly one, with the same error text (2:4 fixes
    its pattern: ``ratio`` is ignored and ``rank`` refused); ``ratio=`` gives the family's
    ``rank_for_ratio`` and keeps at most that fraction of the weights."""
    fam = F.FAMILIES[method]
    lin = nn.Linear(44, 36)
    kw = {"nblocks": 2} if fam.param_name == "nblocks" else {}
    if fam.rank_for_ratio is None:
        m = fam.layer.from_linear(lin, ratio=0.3)
        assert m.ratio == pytest.approx(0.5625, abs=0.01)
        with pytest.raises(ValueError, match=r"rank: 2:4 sparsity has no rank"):
            fam.layer.from_linear(lin, rank=3)
        return
    with pytest.raises(ValueError, match=r"rank/ratio: expected exactly one of them, got rank=2, ratio=0.5"):
        fam.layer.from_linear(lin, rank=2, ratio=0.5, **kw)
    for ratio in (0.2, 0.5):
        m = fam.layer.from_linear(lin, ratio=ratio, **kw)
        assert m.rank == fam.rank_for_ratio(44, 36, ratio, **kw)
        assert m.ratio <= ratio + 1e-9
    assert fam.layer.from_linear(lin, rank=2, **kw).rank == 2


def test_unknown_method_and_init_name_the_choices():
    with pytest.raises(ValueError, match=r"method: expected one of \['lowrank', 'monarch'.*got 'svd'"):
        C.CompressionConfig(method="svd")
    with pytest.raises(ValueError, match=r"init: expected one of \['projection'\], got 'svd'"):
        C.CompressionConfig(method="monarch", init="svd")
    with pytest.raises(TypeError, match="build: expected a callable"):
        F.Init("x", build=None)
    with pytest.raises(ValueError, match=r"needs: expected statistics from \('fisher', 'gram', 'inputs'\), got \['hessian'\]"):
        F.Init("x", build=lambda *a: None, needs=("hessian",))
    with pytest.raises(TypeError, match="layer: expected a FactorizedLinear subclass"):
        dataclasses.replace(F.FAMILIES["lowrank"], name="bad", layer=nn.Linear)
    with pytest.raises(ValueError, match="family: 'lowrank' is already registered"):
        F.register_family(F.FAMILIES["lowrank"])


class HalfLowRank(LowRankLinear):
    """A user's family: low-rank whose factors come from the SVD of half the weight."""

    method = "half_lowrank"


def _half_build(view, ratio, config, stats):
    r = F.FAMILIES["lowrank"].rank_for_ratio(view.in_features, view.out_features, ratio)
    u, v = svd_factors(view.weight * 0.5, r)
    return HalfLowRank.from_factors(u, v, view.bias)


def test_user_family_selected_from_a_config(registry):
    fam = dataclasses.replace(F.FAMILIES["lowrank"], name="half_lowrank", layer=HalfLowRank,
                              inits=(F.Init("half_svd", _half_build),))
    F.register_family(fam)
    cfg = C.CompressionConfig(method="half_lowrank", ratio=0.5, schedule="offline")
    assert cfg.resolved_init == "half_svd" and "half_lowrank" in C.METHODS
    model = tiny_model("llama", intermediate=36)
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    C.compress(model, cfg)
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert swapped and all(type(m) is HalfLowRank for m in swapped.values())
    n, m = next(iter(swapped.items()))
    # the user's init ran: the stored weight is half the rank-r SVD of the original
    u, v = svd_factors(ref[n], m.rank)
    torch.testing.assert_close(m.dense_weight(), 0.5 * (u @ v), rtol=1e-4, atol=1e-5)
    assert F.layer_classes()["HalfLowRank"] is HalfLowRank


def test_user_init_selected_from_a_config(registry):
    calls = []

    def zero_init(view, ratio, config, stats):
        calls.append(sorted(stats or {}))
        lay = F.FAMILIES["lowrank"].get_init("svd").build(view, ratio, config, stats)
        with torch.no_grad():
            lay.u.zero_()
        return lay

    F.register_init("lowrank", F.Init("zeros", zero_init, needs=("gram",)))
    assert C.INITS["lowrank"] == ("svd", "fisher", "activation", "zeros")
    cfg = C.CompressionConfig(method="lowrank", init="zeros", ratio=0.5, schedule="offline", calib_batches=1)
    with pytest.raises(ValueError, match="data: expected a TaskData .*init 'zeros' needs calibration"):
        C.compress(tiny_model("llama", intermediate=36), cfg)
    model = tiny_model("llama", intermediate=36)
    C.compress(model, cfg, tiny_data())
    swapped = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert swapped and all(float(m.u.detach().abs().max()) == 0.0 for m in swapped)
    assert calls and all(c == ["gram"] for c in calls)  # it got the statistic it asked for
    with pytest.raises(ValueError, match="init: 'zeros' is already an init of 'lowrank'"):
        F.register_init("lowrank", F.Init("zeros", zero_init))


def test_deprecated_aliases_still_work():
    from fastfactor.compress import calibration
    from fastfactor.factorize import data_aware

    with pytest.warns(DeprecationWarning, match="use fastfactor.factorize.data_aware.fisher_svd_factors"):
        assert calibration.fisher_svd_factors is data_aware.fisher_svd_factors
    assert C.get_method("lowrank") is F.FAMILIES["lowrank"] and C.available_methods()["sparse24"]
    # the 2:4 format moved to the library side; the kernels module still hands it out, with a warning
    from fastfactor.formats import sparse24 as fmt
    from fastfactor.kernels import sparse24 as K

    for name in ("Sparse24Weight", "pack_24", "prune_24", "mask_24", "to_cutlass_layout", "to_torch_semi_structured"):
        with pytest.warns(DeprecationWarning, match=f"use fastfactor.formats.sparse24.{name}"):
            assert getattr(K, name) is getattr(fmt, name)
    assert fastfactor.Sparse24Weight is fmt.Sparse24Weight
