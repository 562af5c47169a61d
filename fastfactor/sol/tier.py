"""The rows and budgets of the perf tier (``tests/test_perf.py``), shared with
``fastfactor sol --budgets`` so the backlog can be printed without pytest.

Each entry: ``(id, RowSpec, budget name, keyword arguments of the budget)``. Rows are the bench
presets' (issue2-lowrank, issue3-monarch, issue4-sparse24) where the issue names a budget.
"""

from __future__ import annotations

from .rows import RowSpec

L4096 = dict(method="lowrank", in_features=4096, out_features=4096, param=0.25)
M4096 = dict(method="monarch", in_features=4096, out_features=4096, param=4)
S4096 = dict(method="sparse24", in_features=4096, out_features=4096, param=None)

ROWS = {
    "lowrank-4096-M16-fwd": RowSpec(tokens=16, direction="fwd", **L4096),
    "lowrank-4096-M16-fwdbwd": RowSpec(tokens=16, direction="fwd+bwd", **L4096),
    "lowrank-4096-M16384-fwd": RowSpec(tokens=16384, direction="fwd", **L4096),
    "lowrank-4096-M16384-fwdbwd": RowSpec(tokens=16384, direction="fwd+bwd", **L4096),
    "lowrank-768-r0.125-M16-fwd": RowSpec("lowrank", 768, 768, 16, 0.125, "fwd"),
    "lowrank-768-M16384-fwdbwd": RowSpec("lowrank", 768, 768, 16384, 0.25, "fwd+bwd"),
    "monarch-4096-M16384-fwd": RowSpec(tokens=16384, direction="fwd", **M4096),
    "monarch-4096-M4096-fwdbwd": RowSpec(tokens=4096, direction="fwd+bwd", **M4096),
    "monarch-768x3072-M16-fwd": RowSpec("monarch", 768, 3072, 16, 4, "fwd"),
    # few rows over a wide input: the row-block kernel with stage 1 split over programs
    "monarch-3072x768-M16-fwd": RowSpec("monarch", 3072, 768, 16, 4, "fwd"),
    # training at a handful of tokens: the whole backward (dx, dw1, dw2, db) in one launch
    "monarch-3072x768-M16-fwdbwd": RowSpec("monarch", 3072, 768, 16, 4, "fwd+bwd"),
    # training at many rows: g read once (dw2 and db from the dx launch's row-block partials)
    "monarch-768x3072-M16384-fwdbwd": RowSpec("monarch", 768, 3072, 16384, 4, "fwd+bwd"),
    "monarch-3072x768-M16384-fwdbwd": RowSpec("monarch", 3072, 768, 16384, 4, "fwd+bwd"),
    # training over a wide input at 16 blocks: the weight gradients' row splits summed in their launch
    "block_lowrank-3072x768-nb16-M16384-fwdbwd": RowSpec("block_lowrank", 3072, 768, 16384, 16, "fwd+bwd"),
    "sparse24-4096-M16-fwd": RowSpec(tokens=16, direction="fwd", **S4096),
    "sparse24-4096-M64-fwd": RowSpec(tokens=64, direction="fwd", **S4096),
    # a batch PyTorch's 2:4 GEMM does not take (M % 8): our decode kernel runs
    "sparse24-4096-M12-fwd": RowSpec(tokens=12, direction="fwd", **S4096),
    "sparse24-4096-M16384-fwd": RowSpec(tokens=16384, direction="fwd", **S4096),
    "sparse24-4096-M16384-fwdbwd": RowSpec(tokens=16384, direction="fwd+bwd", **S4096),
    "dense_sparse-4096-M16-fwd": RowSpec("dense_sparse", 4096, 4096, 16, 0.25, "fwd"),
    # a handful of tokens on a BERT-size layer: one launch of two roles (gpu-check times the rank
    # split and the library path's two launches as its alternatives)
    "dense_sparse-768x3072-M16-fwd": RowSpec("dense_sparse", 768, 3072, 16, 0.25, "fwd"),
    # training at a handful of tokens: dt, dD and db in one launch (gpu-check times the library's
    # three as its alternative)
    "dense_sparse-768x3072-M16-fwdbwd": RowSpec("dense_sparse", 768, 3072, 16, 0.25, "fwd+bwd"),
    # never slower than the unfused path (two cuBLAS products on S expanded) in training
    "dense_sparse-4096-M16384-fwdbwd": RowSpec("dense_sparse", 4096, 4096, 16384, 0.25, "fwd+bwd"),
    "dense_sparse-768x3072-M16384-fwdbwd": RowSpec("dense_sparse", 768, 3072, 16384, 0.25, "fwd+bwd"),
}

_ALL = list(ROWS)

CASES = (
    # no streamed operand read more than 1.25x its size
    [(r, "reread", {}) for r in ("lowrank-4096-M16-fwd", "lowrank-768-r0.125-M16-fwd", "monarch-4096-M16384-fwd",
                                 "monarch-768x3072-M16-fwd", "sparse24-4096-M16-fwd", "sparse24-4096-M12-fwd",
                                 "dense_sparse-4096-M16-fwd")]
    # a reduction longer than 4096 uses at least as many programs as SMs
    + [(r, "fill", {}) for r in ("lowrank-4096-M16-fwd", "lowrank-768-M16384-fwdbwd", "lowrank-4096-M16384-fwdbwd",
                                 "monarch-4096-M4096-fwdbwd", "sparse24-4096-M16384-fwdbwd")]
    # 16-byte loads of streamed operands, no scalar 2-byte stores
    + [(r, "access", {}) for r in ("lowrank-4096-M16384-fwdbwd", "monarch-4096-M16384-fwd", "monarch-4096-M4096-fwdbwd",
                                   "monarch-3072x768-M16-fwd",
                                   "sparse24-4096-M16-fwd", "sparse24-4096-M12-fwd", "sparse24-4096-M16384-fwdbwd")]
    # the compiled sm_90 build of each launch's chosen config: no local memory, vector loads,
    # no scalar 2-byte stores (compiles cached on disk)
    + [(r, "sass", {}) for r in ("lowrank-4096-M16-fwd", "monarch-4096-M16384-fwd", "sparse24-4096-M16-fwd",
                                 "sparse24-4096-M12-fwd", "monarch-3072x768-M16-fwd")]
    # the 2:4 decode's main loop: at most ~0.05 sm_90 instructions a weight (issue 15)
    + [("sparse24-4096-M12-fwd", "expansion", {})]
    # tensor FLOPs issued at most 1.33x the useful ones
    + [(r, "flops", {}) for r in ("lowrank-4096-M16384-fwd", "lowrank-768-r0.125-M16-fwd", "monarch-4096-M16384-fwd",
                                  "sparse24-4096-M16384-fwd")]
    # predicted speedups at least the BENCHMARKS.md targets
    + [(r, "speedup", {"vs": "unfused", "target": 1.0}) for r in _ALL]
    + [("lowrank-4096-M16384-fwd", "speedup", {"vs": "dense", "target": 3.0}),
       ("lowrank-4096-M16384-fwdbwd", "speedup", {"vs": "dense", "target": 2.5}),
       ("lowrank-4096-M16-fwd", "speedup", {"vs": "dense", "target": 2.0}),
       ("monarch-4096-M16384-fwd", "speedup", {"vs": "unfused", "target": 2.0}),
       ("monarch-4096-M4096-fwdbwd", "speedup", {"vs": "unfused", "target": 2.0}),
       # a compressed layer no slower than the dense one it replaces, at a handful of tokens too
       ("monarch-3072x768-M16-fwd", "speedup", {"vs": "dense", "target": 1.2}),
       ("monarch-3072x768-M16-fwdbwd", "speedup", {"vs": "dense", "target": 2.0}),
       ("dense_sparse-768x3072-M16-fwd", "speedup", {"vs": "dense", "target": 1.0}),
       ("dense_sparse-768x3072-M16-fwdbwd", "speedup", {"vs": "dense", "target": 1.0}),
       ("block_lowrank-3072x768-nb16-M16384-fwdbwd", "speedup", {"vs": "unfused", "target": 2.0}),
       ("monarch-768x3072-M16384-fwdbwd", "speedup", {"vs": "unfused", "target": 2.8}),
       ("monarch-3072x768-M16384-fwdbwd", "speedup", {"vs": "unfused", "target": 2.0}),
       ("sparse24-4096-M16-fwd", "speedup", {"vs": "dense", "target": 1.5}),
       ("sparse24-4096-M64-fwd", "speedup", {"vs": "dense", "target": 1.5}),
       ("sparse24-4096-M16384-fwd", "speedup", {"vs": "torch24", "target": 1.0})]
)


def case_id(row: str, budget: str, kw: dict) -> str:
    extra = f"-{kw['vs']}{kw['target']:g}x" if budget == "speedup" else ""
    return f"{budget}{extra}-{row}"
