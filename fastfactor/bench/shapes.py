"""Layer shapes and named sweep presets for ``fastfactor bench``.

A :class:`Shape` is one linear layer ``in_features → out_features`` with a label. Shape presets
list the distinct projections of well-known transformers (attention and MLP); sweep presets
(:data:`SWEEPS`) fix everything a published table needs, so one command reproduces it.

Shape syntax on the command line: ``768`` (square), ``768x3072`` (in x out), or a preset name;
several separated by commas (``--shapes bert-base,4096x11008``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Shape:
    """One linear layer ``in_features → out_features``."""

    in_features: int
    out_features: int
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    def describe(self) -> str:
        return f"{self.label} {self.name}" if self.label else self.name


def _model(prefix: str, hidden: int, inter: int, kv: Optional[int] = None, gated: bool = False) -> list[Shape]:
    shapes = [Shape(hidden, hidden, f"{prefix}.attn_q/o" if kv else f"{prefix}.attn_qkvo")]
    if kv:
        shapes.append(Shape(hidden, kv, f"{prefix}.attn_k/v"))
    shapes.append(Shape(hidden, inter, f"{prefix}.mlp_gate/up" if gated else f"{prefix}.mlp_up"))
    shapes.append(Shape(inter, hidden, f"{prefix}.mlp_down"))
    return shapes


#: Distinct linear-layer shapes of each model (attention projections first, then the MLP).
#: LLaMA-70B uses grouped-query attention: 8 key/value heads of 128 → k/v project 8192 → 1024.
SHAPE_PRESETS: dict[str, list[Shape]] = {
    "bert-base": _model("bert-base", 768, 3072),
    "bert-large": _model("bert-large", 1024, 4096),
    "llama-7b": _model("llama-7b", 4096, 11008, gated=True),
    "llama-70b": _model("llama-70b", 8192, 28672, kv=1024, gated=True),
    # the CPU small mode: odd sizes, a few milliseconds per call through the references
    "cpu-small": [Shape(96, 96, "cpu-small.square"), Shape(96, 200, "cpu-small.up"),
                  Shape(200, 96, "cpu-small.down")],
}


def parse_shapes(spec: str) -> list[Shape]:
    """``"bert-base,768x3072,4096"`` → shapes (duplicates removed, order kept)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"shapes: expected a comma-separated list like '768x3072,bert-base', got {spec!r}")
    out: list[Shape] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in SHAPE_PRESETS:
            out.extend(SHAPE_PRESETS[item])
            continue
        parts = item.lower().split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"shapes: expected 'IN', 'INxOUT' or one of {sorted(SHAPE_PRESETS)}, got {item!r}"
            ) from None
        if len(dims) not in (1, 2) or min(dims) < 1:
            raise ValueError(f"shapes: expected 'IN' or 'INxOUT' with positive sizes, got {item!r}")
        out.append(Shape(dims[0], dims[-1]))
    seen, unique = set(), []
    for s in out:
        if (s.in_features, s.out_features) not in seen:
            seen.add((s.in_features, s.out_features))
            unique.append(s)
    return unique


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Everything one benchmark table needs.

    methods:    family names (see ``fastfactor.bench.families``)
    params:     per family, the compression settings to sweep (ratios for ``lowrank`` and
                ``dense_sparse``, block counts for ``monarch``/``block_lowrank``; ``sparse24`` has one)
    shapes, tokens, dtypes, directions: the grid
    """

    name: str
    description: str
    methods: tuple[str, ...]
    params: dict
    shapes: tuple[Shape, ...]
    tokens: tuple[int, ...]
    dtypes: tuple[str, ...] = ("bf16",)
    directions: tuple[str, ...] = ("fwd", "fwd+bwd")
    columns: Optional[tuple[str, ...]] = None  # table columns to show (None: the default set)


_RATIOS = (0.125, 0.25, 0.5)
_NBLOCKS = (2, 4, 8)


def _s(*dims: tuple[int, int]) -> tuple[Shape, ...]:
    return tuple(Shape(i, o) for i, o in dims)


SWEEPS: dict[str, Sweep] = {
    "issue2-lowrank": Sweep(
        "issue2-lowrank",
        "fused low-rank vs dense F.linear and the two-matmul path (square layers)",
        ("lowrank",), {"lowrank": _RATIOS},
        _s((768, 768), (4096, 4096), (8192, 8192)), (16, 4096, 16384),
        columns=("shape", "tokens", "direction", "param", "median_ms", "tflops", "floor_ms",
                 "speedup_vs_dense", "speedup_vs_unfused"),
    ),
    "issue3-monarch": Sweep(
        "issue3-monarch",
        "Monarch vs dense F.linear and the two-bmm-with-permutes path",
        ("monarch",), {"monarch": _NBLOCKS},
        _s((768, 3072), (3072, 768), (4096, 4096)), (16, 4096, 16384),
        columns=("shape", "tokens", "direction", "param", "median_ms", "tflops", "floor_ms",
                 "speedup_vs_dense", "speedup_vs_unfused"),
    ),
    "issue4-sparse24": Sweep(
        "issue4-sparse24",
        "2:4 sparse linear vs dense and torch semi-structured; dense-sparse vs its unfused path",
        ("sparse24", "dense_sparse"), {"sparse24": (None,), "dense_sparse": (0.25, 0.5)},
        _s((4096, 4096), (768, 3072)), (16, 64, 4096, 16384),
        columns=("shape", "tokens", "direction", "method", "param", "median_ms", "tflops",
                 "floor_ms", "speedup_vs_dense", "speedup_vs_unfused", "speedup_vs_torch24"),
    ),
}

#: one sweep per model shape preset, every family at its default settings
for _name in ("bert-base", "bert-large", "llama-7b", "llama-70b"):
    SWEEPS[_name] = Sweep(
        _name, f"every family on the {_name} projections",
        ("lowrank", "monarch", "block_lowrank", "sparse24", "dense_sparse"),
        {"lowrank": _RATIOS, "monarch": _NBLOCKS, "block_lowrank": _NBLOCKS, "sparse24": (None,),
         "dense_sparse": (0.25, 0.5)},
        tuple(SHAPE_PRESETS[_name]), (16, 4096),
    )

#: what the CPU small mode keeps of any sweep: small odd shapes, few tokens, fp32, forward first
CPU_SMALL = dict(shapes=tuple(SHAPE_PRESETS["cpu-small"]), tokens=(8, 64), dtypes=("fp32",))


def sweep_names() -> Sequence[str]:
    return sorted(SWEEPS)
