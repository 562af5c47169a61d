"""``fastfactor bench --joint qkv|mlp``: modules compressed together, **measured** (a GPU, or the CPU
reference in the CPU figures' small mode), beside the predicted rows of ``fastfactor sol --joint``.

For every low-rank setting × shape ``(K -> N)`` × tokens × dtype of the sweep, a group of ``g``
members reading one input (``qkv``: 3, ``mlp``: 2) is timed two ways on the same ``x``, forward
under ``torch.no_grad()``:

* ``separate_ms``: ``g`` :class:`~fastfactor.LowRankLinear` of rank ``r_s = floor(ρ·K·N/(K+N))``;
* ``joint_ms``: the :class:`~fastfactor.layers.JointLowRankLinear` leader and its members at the same
  budget (rank ``r``, :func:`fastfactor.sol.joint.joint_rank`): one launch for the group;
* ``dense_separate_ms`` / ``dense_fused_ms``: ``g`` ``F.linear`` against one fused ``(K -> g·N)``.
"""

from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F

from ..layers import JointLowRankLinear, LowRankLinear
from ..sol.joint import MEMBERS, joint_rank
from .timing import time_calls


def joint_bench_rows(cfg, kind: str, log: Callable[[str], None] = print) -> List[dict]:
    """The rows (see the module docstring) for the low-rank settings of ``cfg`` (a ``BenchConfig``)."""
    if kind not in MEMBERS:
        raise ValueError(f"joint: expected one of {sorted(MEMBERS)}, got {kind!r}")
    g = MEMBERS[kind]
    ratios = cfg.params.get("lowrank") or (0.25, 0.5)
    dev, out = cfg.device, []
    kw = dict(warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, graph_below_ms=cfg.graph_below_ms, use_graph=cfg.use_graph)
    for dt in cfg.dtypes:
        for shape in cfg.shapes:
            k, n = shape.in_features, shape.out_features
            for ratio in ratios:
                rs, r = joint_rank(k, n, g, float(ratio))
                torch.manual_seed(0)
                sep = [LowRankLinear(k, n, rs, bias=cfg.bias).to(dev, dt) for _ in range(g)]
                inner = LowRankLinear(k, g * n, r, bias=cfg.bias).to(dev, dt)
                lead = JointLowRankLinear.from_inner(inner, [f"m{i}" for i in range(g)], [n] * g, cfg.bias)
                group = [lead] + lead.members()
                w = torch.randn(g * n, k, device=dev, dtype=dt)
                b = torch.randn(g * n, device=dev, dtype=dt) if cfg.bias else None
                for M in cfg.tokens:
                    x = torch.randn(M, k, device=dev, dtype=dt)
                    with torch.no_grad():
                        t_sep = time_calls([lambda: [m(x) for m in sep]], dev, **kw)
                        t_joint = time_calls([lambda: [m(x) for m in group]], dev, **kw)
                        t_dsep = time_calls([lambda: [F.linear(x, w[i * n:(i + 1) * n], None if b is None else
                                                               b[i * n:(i + 1) * n]) for i in range(g)]], dev, **kw)
                        t_dfused = time_calls([lambda: F.linear(x, w, b).split(n, -1)], dev, **kw)
                    out.append(dict(
                        kind=kind, shape=f"{k}x{g}*{n}", tokens=M, dtype=str(dt).replace("torch.", ""), ratio=float(ratio),
                        rank_separate=rs, rank_joint=r, separate_ms=t_sep.ms, joint_ms=t_joint.ms,
                        speedup_vs_separate=t_sep.ms / t_joint.ms if t_joint.ms else None,
                        dense_separate_ms=t_dsep.ms, dense_fused_ms=t_dfused.ms, timer=t_joint.mode,
                        cpu_figures=dev.type != "cuda",
                    ))
                    log(f"joint {kind} {k}x{g}*{n} M={M} ratio={ratio}: separate {t_sep.ms:.4g} ms, joint {t_joint.ms:.4g} ms")
    return out


COLUMNS = ("kind", "shape", "tokens", "dtype", "ratio", "rank_separate", "rank_joint", "separate_ms", "joint_ms",
           "speedup_vs_separate", "dense_separate_ms", "dense_fused_ms", "timer")

__all__ = ["joint_bench_rows", "COLUMNS"]
