"""The factorization families: ONE declaration each, everything else derives from it.

A :class:`Family` says, in one place, what the rest of the code needs to know about a method:

* ``layer``: its :class:`~fastfactor.layers.base.FactorizedLinear` class (``layer.method`` is
  the family name);
* ``inits``: the initializations it accepts (:class:`Init`, the first is the default), each with
  the calibration statistics it needs (``"fisher"``: squared gradients ``(out, in)``; ``"gram"``:
  ``XᵀX (in, in)``) and the builder that fits the layer to a dense weight;
* ``rank_for_ratio(in, out, ratio, nblocks)``: the rank that keeps ``ratio`` of the dense
  weights (``None`` for a fixed pattern: 2:4), one per family in :mod:`fastfactor.factorize`;
* ``fwd_flops(module, tokens)``: the factorized work of one forward (bytes are the compulsory
  traffic of :func:`fastfactor.bench.families.bytes_for`, from the module's own tensors);
* ``kernels``: the module of its Triton kernels (importing it registers them with
  ``fastfactor compile-check``);
* what the benchmark sweeps (``param_name``, ``defaults``), how it builds a layer of a given
  shape without fitting it (``random_layer``), and its unfused PyTorch baseline.

Derived from :data:`FAMILIES`: the config's ``method`` / ``init`` validation
(:mod:`fastfactor.compress.config`), the CLI choices, the driver's builders
(:mod:`fastfactor.compress.methods`), the benchmark (:mod:`fastfactor.bench.families`), the
evidence script, compile-check, the manifest loader's class table and the README's method table
(:func:`markdown_table`).

Adding a family is one :func:`register_family` call (a layer class, its inits, its counts); adding
an initialization to an existing family is one :func:`register_init` call. Both can come from user
code, and a :class:`~fastfactor.compress.CompressionConfig` then selects them by name.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .factorize import data_aware
from .factorize.monarch import monarch_rank_for_ratio
from .factorize.sparse24 import dense_sparse_rank_for_ratio
from .factorize.svd import rank_for_ratio as lowrank_rank_for_ratio
from .kernels import lowrank as _lowrank_kernels
from .kernels import monarch as _monarch_kernels
from .kernels import sparse24 as _sparse24_kernels
from .layers import BlockLowRankLinear, DenseSparseLinear, LowRankLinear, MonarchLinear, Sparse24Linear
from .layers.bottleneck import BottleneckLinear

#: the statistics an init may ask for (collected by fastfactor.compress.calibration); "inputs": a
#: float32 sample ``(n, in)`` of the module's input rows (non-padding tokens, at most ``ae_tokens``)
STATISTICS = ("fisher", "gram", "inputs")


@dataclasses.dataclass(frozen=True)
class Init:
    """One initialization of a family.

    name:  what a config's ``init`` names
    build: ``build(view, ratio, config, stats) -> layer``: fit the family's layer to the dense
           ``view`` (``weight (out, in)``, ``bias``, ``in_features``, ``out_features``: an
           ``nn.Linear`` or the driver's ``DenseView``), keeping ``ratio`` of its weights; ``config``
           is the :class:`~fastfactor.compress.CompressionConfig` (``nblocks``...), ``stats`` the
           statistics of this module ``{"fisher": F, "gram": G}`` (only those in ``needs``)
    needs: the statistics it needs, a subset of :data:`STATISTICS`
    doc:   one line for the docs table
    """

    name: str
    build: Callable
    needs: Tuple[str, ...] = ()
    doc: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty str, got {self.name!r}")
        if not callable(self.build):
            raise TypeError(f"build: expected a callable (view, ratio, config, stats) -> layer, got {self.build!r}")
        bad = [n for n in self.needs if n not in STATISTICS]
        if bad:
            raise ValueError(f"needs: expected statistics from {STATISTICS}, got {bad}")


@dataclasses.dataclass(frozen=True)
class Family:
    """One factorization family (see the module docstring)."""

    name: str
    layer: type
    inits: Tuple[Init, ...]
    fwd_flops: Callable[[nn.Module, int], Tuple[int, str]]
    random_layer: Callable[..., nn.Module]
    rank_for_ratio: Optional[Callable[..., int]] = None
    kernels: Optional[ModuleType] = None
    param_name: str = "ratio"
    defaults: tuple = (0.25, 0.5)
    unfused: str = ""
    torch24: bool = False
    ratio_formula: str = ""
    doc: str = ""

    def __post_init__(self):
        from .layers.base import FactorizedLinear

        if not (isinstance(self.layer, type) and issubclass(self.layer, FactorizedLinear)):
            raise TypeError(f"layer: expected a FactorizedLinear subclass, got {self.layer!r}")
        if not self.inits or not all(isinstance(i, Init) for i in self.inits):
            raise TypeError(f"inits: expected a non-empty tuple of Init, got {self.inits!r}")
        object.__setattr__(self, "inits", tuple(self.inits))
        if self.param_name not in ("ratio", "nblocks", ""):
            raise ValueError(f"param_name: expected 'ratio', 'nblocks' or '', got {self.param_name!r}")

    # ---- derived views -----------------------------------------------------------------------
    @property
    def init_names(self) -> Tuple[str, ...]:
        return tuple(i.name for i in self.inits)

    @property
    def default_init(self) -> str:
        return self.inits[0].name

    @property
    def needs(self) -> Dict[str, Tuple[str, ...]]:
        """``{init name: statistics it needs}``."""
        return {i.name: tuple(i.needs) for i in self.inits}

    def get_init(self, name: str) -> Init:
        for i in self.inits:
            if i.name == name:
                return i
        raise ValueError(f"init: expected one of {list(self.init_names)} for method {self.name!r}, got {name!r}")

    def layer_class(self) -> type:
        return self.layer

    # the bench's older field names
    @property
    def cls(self) -> str:
        return self.layer.__name__

    @property
    def module(self) -> str:
        return self.layer.__module__


#: every family, by name, in declaration order (user code adds with :func:`register_family`)
FAMILIES: Dict[str, Family] = {}


def register_family(family: Family, replace: bool = False) -> Family:
    """Add ``family`` (``replace=True`` to redeclare an existing name). Its kernels, if any, were
    registered with compile-check when their module was imported."""
    if not isinstance(family, Family):
        raise TypeError(f"family: expected a fastfactor.families.Family, got {type(family).__name__}")
    if family.name in FAMILIES and not replace:
        raise ValueError(f"family: {family.name!r} is already registered (pass replace=True to redeclare it)")
    FAMILIES[family.name] = family
    return family


def register_init(method: str, init: Init, replace: bool = False) -> Family:
    """Add an initialization to the family ``method``; a config selects it with ``init=init.name``."""
    fam = get_family(method)
    if not isinstance(init, Init):
        raise TypeError(f"init: expected a fastfactor.families.Init, got {type(init).__name__}")
    if init.name in fam.init_names and not replace:
        raise ValueError(f"init: {init.name!r} is already an init of {method!r} (pass replace=True)")
    inits = tuple(i for i in fam.inits if i.name != init.name) + (init,)
    if init.name in fam.init_names:  # keep its position (the first stays the default)
        inits = tuple(init if i.name == init.name else i for i in fam.inits)
    return register_family(dataclasses.replace(fam, inits=inits), replace=True)


def get_family(name: str) -> Family:
    if not isinstance(name, str):
        raise TypeError(f"method: expected one of {list(FAMILIES)}, got {type(name).__name__} {name!r}")
    if name not in FAMILIES:
        raise ValueError(f"method: expected one of {list(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


#: layer classes a saved manifest may name that are not a family's own layer: the modules compressed
#: together (:mod:`fastfactor.layers.joint`; their inner layer is a family's)
EXTRA_LAYER_CLASSES: Dict[str, type] = {}


def layer_classes() -> Dict[str, type]:
    """Layer classes by class name (what a saved manifest names)."""
    out = {f.layer.__name__: f.layer for f in FAMILIES.values()}
    out.update(EXTRA_LAYER_CLASSES)
    return out


class _LiveNames(Sequence):
    """The family names as a tuple-like sequence that follows :data:`FAMILIES`."""

    def __getitem__(self, i):
        return tuple(FAMILIES)[i]

    def __len__(self) -> int:
        return len(FAMILIES)

    def __contains__(self, name) -> bool:
        return name in FAMILIES

    def __repr__(self) -> str:
        return repr(tuple(FAMILIES))

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented


class _LiveInits(Mapping):
    """``{method: init names}`` (the first is the default) that follows :data:`FAMILIES`."""

    def __getitem__(self, method: str) -> Tuple[str, ...]:
        return FAMILIES[method].init_names

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(FAMILIES))

    def __len__(self) -> int:
        return len(FAMILIES)

    def __repr__(self) -> str:
        return repr(dict(self))


#: live views for the config and the CLI
METHODS: Sequence[str] = _LiveNames()
INITS: Mapping[str, Tuple[str, ...]] = _LiveInits()


def markdown_table() -> str:
    """The README's table of methods, generated from the declarations."""
    def path(module: str) -> str:
        return module.replace("fastfactor.kernels.", "kernels.").replace(".", "/") + ".py"

    lines = ["| method | layer | ratio -> rank | inits (first = default; statistics needed) | kernels |",
             "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        inits = ", ".join(f"`{i.name}`" + (f" ({'+'.join(i.needs)})" if i.needs else "") for i in f.inits)
        kern = f"`{path(f.kernels.__name__)}`" if f.kernels else "-"
        lines.append(f"| `{f.name}` | `{f.layer.__name__}` (`{path(f.layer.__module__)}`) | {f.ratio_formula} "
                     f"| {inits} | {kern} |")
    return "\n".join(lines)


# ============================================================================================
# the built-in families
# ============================================================================================

def _stat(stats, key: str, init: str) -> torch.Tensor:
    if not stats or stats.get(key) is None:
        raise ValueError(f"init: {init!r} needs {key} statistics; pass calibration data (data=...)")
    return stats[key]


def _random_linear(in_f, out_f, dtype, device, bias) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=torch.float32)
    return lin.to(dtype)


# ---- low-rank ----------------------------------------------------------------------------------

def _lowrank_svd(view, ratio, config, stats):
    return LowRankLinear.from_linear(view, ratio=ratio)


def _lowrank_fisher(view, ratio, config, stats):
    r = lowrank_rank_for_ratio(view.in_features, view.out_features, ratio)
    fisher = _stat(stats, "fisher", "fisher").to(view.weight.device)
    u, v = data_aware.fisher_svd_factors(view.weight, r, fisher)
    return LowRankLinear.from_factors(u, v, view.bias)


def _lowrank_activation(view, ratio, config, stats):
    r = lowrank_rank_for_ratio(view.in_features, view.out_features, ratio)
    gram = _stat(stats, "gram", "activation").to(view.weight.device)
    u, v, _ = data_aware.whitened_svd_factors(view.weight, r, gram)
    return LowRankLinear.from_factors(u, v, view.bias)


def _lowrank_random(in_f, out_f, ratio, dtype, device, bias, opts):
    return LowRankLinear(in_f, out_f, lowrank_rank_for_ratio(in_f, out_f, ratio), bias=bias, dtype=dtype, device=device)


def _lowrank_flops(m, tokens):
    return 2 * tokens * m.rank * (m.in_features + m.out_features), "2·M·r·(K+N)"


# ---- Monarch and block-wise low-rank -------------------------------------------------------------

def _projection(layer):
    def build(view, ratio, config, stats):
        return layer.from_linear(view, nblocks=config.nblocks, ratio=ratio)

    return build


def _blocks_random(layer):
    def random_layer(in_f, out_f, nblocks, dtype, device, bias, opts):
        rank = int(opts.get("block_rank", 1))
        return layer(in_f, out_f, nblocks, rank=rank, bias=bias, dtype=dtype, device=device)

    return random_layer


def _monarch_rank(in_f, out_f, ratio, nblocks=4):
    return monarch_rank_for_ratio(in_f, out_f, nblocks, ratio)


def _stored_flops(m, tokens):
    return 2 * tokens * int(m.num_weight_params), "2·M·P (P = stored factor weights)"


# ---- 2:4 ---------------------------------------------------------------------------------------

def _sparse24_magnitude(view, ratio, config, stats):
    return Sparse24Linear.from_linear(view)


def _sparse24_scored(kind):
    def build(view, ratio, config, stats):
        scores = data_aware.sparse24_scores(
            view.weight, kind, fisher=(stats or {}).get("fisher"), gram=(stats or {}).get("gram"),
        ).to(device=view.weight.device)
        return Sparse24Linear.from_linear(view, scores=scores)

    return build


def _sparse24_random(in_f, out_f, _param, dtype, device, bias, opts):
    return Sparse24Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)


def _sparse24_flops(m, tokens):
    return tokens * m.in_features * m.out_features, "M·K·N (half of the dense 2·M·K·N)"


# ---- dense-sparse --------------------------------------------------------------------------------

def _dense_sparse(init):
    def build(view, ratio, config, stats):
        return DenseSparseLinear.from_linear(view, ratio=ratio, init=init)

    return build


def _dense_sparse_random(in_f, out_f, ratio, dtype, device, bias, opts):
    rank = dense_sparse_rank_for_ratio(in_f, out_f, ratio)
    return DenseSparseLinear(in_f, out_f, rank, bias=bias, dtype=dtype, device=device)


def _dense_sparse_flops(m, tokens):
    # S (r, K) keeps K/2 per row; D (N, r) dense
    r = m.rank
    return tokens * r * m.in_features + 2 * tokens * m.out_features * r, "M·r·K + 2·M·N·r"


# ---- autoencoder bottlenecks (Banaei et al., EACL 2023) -----------------------------------------

def _autoencoder_pca(view, ratio, config, stats):
    """Closed-form principal subspace of the module's outputs on its calibration inputs, then Adam
    with held-out early stopping (:func:`fastfactor.factorize.autoencoder.fit_bottleneck`); the form
    (``config.ae_form``: linear -> ``LowRankLinear``, nonlinear -> ``BottleneckLinear``) and the
    fitting settings come from the config (``ae_*``; defaults where a config lacks them)."""
    from .factorize.autoencoder import fit_bottleneck

    r = lowrank_rank_for_ratio(view.in_features, view.out_features, ratio)
    x = _stat(stats, "inputs", "pca")
    get = lambda name, default: getattr(config, name, default) if config is not None else default
    bn = fit_bottleneck(view.weight, view.bias, x, r, form=get("ae_form", "linear"),
                        act=get("ae_activation", "relu"), steps=get("ae_steps", 200), lr=get("ae_lr", 1e-2),
                        seed=get("seed", 0))
    return bn.layer(view.weight.dtype)


def _autoencoder_random(in_f, out_f, ratio, dtype, device, bias, opts):
    r = lowrank_rank_for_ratio(in_f, out_f, ratio)
    return BottleneckLinear(in_f, out_f, r, act=opts.get("act", "relu"), bias=bias, dtype=dtype, device=device)


def _blocks_family(name, layer, unfused, doc):
    """Monarch and block-wise low-rank: the same machinery, strided or contiguous blocks."""
    return Family(
        name, layer,
        inits=(Init("projection", _projection(layer), doc="optimal projection (SVD per block)"),),
        fwd_flops=_stored_flops, random_layer=_blocks_random(layer),
        rank_for_ratio=_monarch_rank, kernels=_monarch_kernels,
        param_name="nblocks", defaults=(2, 4, 8), unfused=unfused,
        ratio_formula="r = floor(ratio·in·out / (b·(Kp+Np))), in [1, min(kb, nb)]", doc=doc,
    )


for _family in (
    Family(
        "lowrank", LowRankLinear,
        inits=(Init("svd", _lowrank_svd, doc="truncated SVD"),
               Init("fisher", _lowrank_fisher, ("fisher",), "Fisher-weighted SVD (Hsu et al. 2022)"),
               Init("activation", _lowrank_activation, ("gram",), "activation-aware (whitened) SVD")),
        fwd_flops=_lowrank_flops, random_layer=_lowrank_random,
        rank_for_ratio=lambda in_f, out_f, ratio, nblocks=None: lowrank_rank_for_ratio(in_f, out_f, ratio),
        kernels=_lowrank_kernels, defaults=(0.125, 0.25, 0.5), unfused="two matmuls (x·Vᵀ)·Uᵀ",
        ratio_formula="r = floor(ratio·in·out / (in+out)), >= 1",
        doc="W ≈ U·V, fused chain kernel",
    ),
    _blocks_family("monarch", MonarchLinear, "two bmm with the permutes", "block-diagonal with permutations"),
    _blocks_family("block_lowrank", BlockLowRankLinear, "two bmm on contiguous blocks",
                   "block-wise low-rank (contiguous blocks)"),
    Family(
        "sparse24", Sparse24Linear,
        inits=(Init("magnitude", _sparse24_magnitude, doc="|W|"),
               Init("fisher", _sparse24_scored("fisher"), ("fisher",), "W²·F"),
               Init("activation", _sparse24_scored("activation"), ("gram",), "|W_ij|·‖X_j‖")),
        fwd_flops=_sparse24_flops, random_layer=_sparse24_random, rank_for_ratio=None,
        kernels=_sparse24_kernels, param_name="", defaults=(None,),
        unfused="dense matmul of the expanded 2:4 weight", torch24=True,
        ratio_formula="fixed: 2:4 keeps 0.5625 (values + metadata)", doc="2:4 semi-structured",
    ),
    Family(
        "dense_sparse", DenseSparseLinear,
        inits=(Init("svd_als", _dense_sparse("svd_als"), doc="SVD, 2:4 prune, alternating least squares"),
               Init("svd", _dense_sparse("svd"), doc="SVD and 2:4 prune only (fast)")),
        fwd_flops=_dense_sparse_flops, random_layer=_dense_sparse_random,
        rank_for_ratio=lambda in_f, out_f, ratio, nblocks=None: dense_sparse_rank_for_ratio(in_f, out_f, ratio),
        kernels=_sparse24_kernels, defaults=(0.25, 0.5),
        unfused="D·(S·x): dense matmul of the expanded 2:4 S, then D",
        ratio_formula="largest r with out·r + r·in/2 + meta <= ratio·in·out",
        doc="dense × 2:4 (DSFormer)",
    ),
    Family(
        "autoencoder", BottleneckLinear,
        inits=(Init("pca", _autoencoder_pca, ("inputs",),
                    "output principal subspace, then Adam (held-out early stop); ae_form linear | nonlinear"),),
        fwd_flops=_lowrank_flops, random_layer=_autoencoder_random,
        rank_for_ratio=lambda in_f, out_f, ratio, nblocks=None: lowrank_rank_for_ratio(in_f, out_f, ratio),
        kernels=_lowrank_kernels, defaults=(0.125, 0.25, 0.5), unfused="two matmuls, σ between: σ(x·Vᵀ+c)·Uᵀ",
        ratio_formula="r = floor(ratio·in·out / (in+out)), >= 1 (U, V; c, b are biases)",
        doc="autoencoder bottleneck y ≈ D·σ(E·W·x + c) + d: LowRankLinear (linear) or BottleneckLinear",
    ),
):
    register_family(_family)
del _family

from .layers.joint import JointLowRankLinear, JointMemberLinear  # noqa: E402 - modules compressed together

EXTRA_LAYER_CLASSES.update(JointLowRankLinear=JointLowRankLinear, JointMemberLinear=JointMemberLinear)

__all__ = [
    "Family", "Init", "FAMILIES", "METHODS", "INITS", "STATISTICS", "register_family", "register_init",
    "get_family", "layer_classes", "markdown_table", "EXTRA_LAYER_CLASSES",
]
