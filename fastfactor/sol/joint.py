"""``fastfactor sol --joint qkv|mlp``: the modules compressed together against separate factors
(**predicted, not measured**).

A group of ``g`` members of shape ``(K -> N)`` each (``qkv``: g = 3, the query / key / value of one
attention; ``mlp``: g = 2, gate and up) at ratio ``ρ``:

* **separate**: ``g`` low-rank layers of rank ``r_s = floor(ρ·K·N/(K+N))``: ``g`` times the row of
  one ``(K -> N)`` layer (its launches, each reading ``x`` again);
* **joint** (:mod:`fastfactor.layers.joint`): one low-rank layer ``(K -> g·N)`` of rank
  ``r = floor(g·r_s·(K+N) / (K+g·N))`` — the same weight budget — computed by **one** chain launch
  (or the dispatcher's path for that shape) that reads ``x`` once and writes every member's output;
* the dense baselines: ``g`` separate GEMMs (``dense_separate_ms``) and one fused ``(K -> g·N)`` GEMM
  (``dense_fused_ms``, what GPT-2's ``c_attn`` runs).

Every figure comes from :func:`fastfactor.sol.rows.evaluate_row` (exact counts under the Triton
interpreter, the device model of :mod:`fastfactor.sol.model`).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from ..factorize.svd import rank_for_ratio

#: group kinds -> members per group
MEMBERS = {"qkv": 3, "mlp": 2}

COLUMNS = ("kind", "shape", "tokens", "direction", "ratio", "rank_separate", "rank_joint", "launches_separate",
           "launches_joint", "separate_ms", "joint_ms", "speedup_vs_separate", "dense_separate_ms", "dense_fused_ms",
           "speedup_vs_dense_fused")


def joint_rank(k: int, n: int, g: int, ratio: float) -> Tuple[int, int]:
    """``(r_s, r)``: each separate member's rank and the group's (same budget, see the module docstring)."""
    rs = rank_for_ratio(k, n, ratio)
    r = max(1, min(g * rs * (k + n) // (k + g * n), k, g * n))
    return rs, r


def joint_rows(pairs: Sequence[tuple], kind: str, device, configs: str = "all") -> List[dict]:
    """One row per low-rank ``(spec, row)`` of ``pairs`` (``RowSpec`` and its evaluated row): the
    group of ``MEMBERS[kind]`` such layers, separate against joint. Predicted, not measured."""
    from .rows import RowSpec, evaluate_row

    if kind not in MEMBERS:
        raise ValueError(f"joint: expected one of {sorted(MEMBERS)}, got {kind!r}")
    g = MEMBERS[kind]
    out = []
    for spec, row in pairs:
        if spec.method != "lowrank":
            continue
        k, n = spec.in_features, spec.out_features
        rs, r = joint_rank(k, n, g, float(spec.param))
        rho = min(1.0, (r + 0.5) * (k + g * n) / float(k * g * n))  # rank_for_ratio(k, g·n, rho) == r
        if rank_for_ratio(k, g * n, rho) != r:
            raise ValueError(f"joint: no ratio gives rank {r} for ({k} -> {g * n})")
        jrow = evaluate_row(RowSpec("lowrank", k, g * n, spec.tokens, rho, spec.direction, spec.dtype), device,
                            configs=configs)
        sep = g * row["predicted_ms"]
        out.append(dict(
            kind=kind, shape=f"{k}x{g}*{n}", in_features=k, out_features=n, members=g, tokens=spec.tokens,
            direction=spec.direction, dtype=spec.dtype, ratio=float(spec.param), rank_separate=rs, rank_joint=r,
            params_separate=g * rs * (k + n), params_joint=r * (k + g * n),
            launches_separate=g * row["launches"], launches_joint=jrow["launches"],
            kernels_joint=jrow["kernels"], separate_ms=sep, joint_ms=jrow["predicted_ms"],
            speedup_vs_separate=sep / jrow["predicted_ms"] if jrow["predicted_ms"] else None,
            dense_separate_ms=g * row["dense_ms"], dense_fused_ms=jrow["dense_ms"],
            speedup_vs_dense_fused=jrow["dense_ms"] / jrow["predicted_ms"] if jrow["predicted_ms"] else None,
            device=device.name, status=row.get("status"),
        ))
    return out


__all__ = ["MEMBERS", "COLUMNS", "joint_rank", "joint_rows"]
