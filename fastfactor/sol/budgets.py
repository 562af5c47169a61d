"""Performance budgets checked on recorded launches (the perf tier, ``tests/test_perf.py``).

Each budget looks at one evaluated row (:func:`fastfactor.sol.rows.evaluate_row`) and returns
``(ok, figure, target)``: the figure found and what the budget asks, as text for the backlog table.
Figures are exact counts or **predicted, not measured** times.

* ``reread``: no streamed operand (a tensor of at least 64 KiB) is loaded more than 1.25x its size
  by a launch that is predicted memory-bound, nor by any launch when it does not fit in half the L2
  (its re-reads then come from DRAM);
* ``fill``: a launch whose per-program reduction is longer than 4096 uses at least as many programs
  as the device has SMs;
* ``access``: streamed operands are loaded in runs of at least 16 contiguous bytes and outputs are
  not stored as scalar 2-byte words (widest contiguous run of each access in the interpreter; the
  compiled SASS confirms it where compile-check reads it);
* ``flops``: tensor-core FLOPs issued at most 1.33x the useful FLOPs of the row;
* ``speedup``: the predicted speedups of the row at least the BENCHMARKS.md targets.
"""

from __future__ import annotations

from typing import Optional

STREAMED = 64 * 1024


def reread(row: dict, device, limit: float = 1.25):
    worst = (0.0, "")
    for e in row["detail"]:
        mem_bound = e["bound"] in ("dram", "l2")
        for name, t in e["tensors"].items():
            if not t["load"] or t["size"] < STREAMED or not t["reread"]:
                continue
            if mem_bound or t["size"] > device.l2_bytes / 2:
                if t["reread"] > worst[0]:
                    worst = (t["reread"], f"{e['kernel']}({e['phase']}).{name.split('/')[0]}")
    ok = worst[0] <= limit
    return ok, (f"{worst[1]} read {worst[0]:.1f}x its size" if worst[1] else "no streamed re-read"), f"<= {limit}x"


def fill(row: dict, device, min_reduction: int = 4096):
    worst = None
    for e in row["detail"]:
        if e["reduction"] > min_reduction and e["programs"] < device.sms:
            if worst is None or e["programs"] < worst["programs"]:
                worst = e
    if worst is None:
        return True, "every long reduction fills the SMs", f">= {device.sms} programs"
    return (False, f"{worst['kernel']}({worst['phase']}) {worst['programs']} programs, reduction {worst['reduction']}",
            f">= {device.sms} programs when reduction > {min_reduction}")


def access(row: dict, device, min_load: int = 16, min_store: int = 4):
    bad = []
    for e in row["detail"]:
        for name, t in e["tensors"].items():
            if t["size"] < STREAMED:
                continue
            if t["load"] and t["load_access"] and t["load_access"] < min_load:
                bad.append(f"{e['kernel']}({e['phase']}).{name.split('/')[0]} loads {t['load_access']} B")
            if t["store"] and t["store_access"] and t["store_access"] < min_store:
                bad.append(f"{e['kernel']}({e['phase']}).{name.split('/')[0]} stores {t['store_access']} B")
    return (not bad, "; ".join(sorted(set(bad))) or "vector-wide accesses",
            f"loads >= {min_load} B contiguous, stores > 2 B")


def flops(row: dict, device, limit: float = 1.33):
    r = row["flops_ratio"] or 0.0
    return r <= limit, f"issued/useful = {r:.2f}", f"<= {limit}"


def speedup(row: dict, device, vs: str, target: float):
    s: Optional[float] = row.get(f"speedup_vs_{vs}")
    if s is None:
        return False, f"no {vs} baseline", f">= {target}x vs {vs}"
    return s >= target, f"{s:.2f}x vs {vs} (predicted)", f">= {target}x vs {vs}"


def sass(row: dict, device):
    """On the compiled sm_90 build of each launch's chosen config (``attach_sass``): no local memory
    (``LDL``/``STL``, stack > 0), no scalar 2-byte stores, 16-byte or TMA loads present."""
    bad = []
    for e in row["detail"]:
        f = e.get("sass")
        if not f:
            continue
        name = f"{e['kernel']}({e['phase']}) {e['config_label']}"
        if "error" in f:
            bad.append(f"{name}: build failed")
            continue
        if f.get("spill") or f.get("ldl") or f.get("stl"):
            bad.append(f"{name}: {f.get('spill')} B spill, {f.get('ldl')} LDL/{f.get('stl')} STL")
        if f.get("stg_u16"):
            bad.append(f"{name}: {f['stg_u16']} STG.E.U16")
        if not (f.get("ldg128") or f.get("ldgsts128") or f.get("utmaldg")):
            loads = ",".join(m for m in f.get("global_mnemonics", []) if m.startswith("LDG")) or "?"
            bad.append(f"{name}: no 16-byte/TMA loads ({loads})")
    return not bad, "; ".join(bad) or "no spill, vector loads, no scalar stores", \
        "no LDL/STL, no STG.E.U16, LDG.E.128/LDGSTS.128/UTMALDG (sm_90)"


def attach_sass(row: dict, arch: int = 90) -> dict:
    """Compile (cached) and read the SASS of every launch of the row; facts under ``e['sass']``."""
    from .sass import jobs_for, read_launches

    todo = [e for e in row["detail"] if e.get("signature") and "sass" not in e]
    for e, f in zip(todo, read_launches(jobs_for(todo, arch))):
        e["sass"] = f
    return row


CHECKS = {"reread": reread, "fill": fill, "access": access, "flops": flops, "speedup": speedup, "sass": sass}


def check(name: str, row: dict, device, **kw):
    if name not in CHECKS:
        raise ValueError(f"budget: expected one of {sorted(CHECKS)}, got {name!r}")
    return CHECKS[name](row, device, **kw)
