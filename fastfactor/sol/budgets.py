"""Performance budgets checked on recorded launches (the perf tier, ``tests/test_perf.py``).

Each budget looks at one evaluated row (:func:`fastfactor.sol.rows.evaluate_row`) and returns
``(ok, figure, target)``: the figure found and what the budget asks, as text for the backlog table.
Figures are exact counts or **predicted, not measured** times.

* ``reread``: in a launch that is predicted memory- or issue-bound (and in any launch for an operand that
  does not fit in half the L2, whose re-reads then come from DRAM), a streamed operand (at least
  64 KiB) is loaded at most 1.25x its size — except an *L2-resident* operand (at most 1/8 of the
  L2) of a memory-bound launch, whose re-read bytes beyond its first read must be at most 25 % of
  the launch's DRAM bytes (see :func:`reread`);
* ``fill``: a launch whose per-program reduction is longer than 4096 uses at least as many programs
  as the device has SMs;
* ``access``: streamed operands are loaded in runs of at least 16 contiguous bytes (or narrower
  where the lanes' words interleave so that every 32-byte sector an access touches is used whole)
  and outputs are not stored as scalar 2-byte words (widest contiguous run of each access in the
  interpreter; the compiled SASS confirms it where compile-check reads it);
* ``flops``: tensor-core FLOPs issued at most 1.33x the useful FLOPs of the row;
* ``speedup``: the predicted speedups of the row at least the BENCHMARKS.md targets.
"""

from __future__ import annotations

from typing import Optional

STREAMED = 64 * 1024


#: an operand at most this fraction of the L2 stays resident while a launch streams its other operands
L2_RESIDENT_FRACTION = 1 / 8
#: re-read bytes (beyond the first read) of an L2-resident operand, as a fraction of the launch's DRAM bytes
L2_REREAD_SHARE = 0.25


def reread(row: dict, device, limit: float = 1.25, share: float = L2_REREAD_SHARE):
    """Streamed operands (``>= 64 KiB``) are not re-read more than the physics of the launch needs.

    * An operand larger than 1/8 of the L2, in a memory-bound launch (or larger than half the L2, in
      any launch): loaded at most ``limit`` (1.25) times its size.
    * An *L2-resident* operand (at most 1/8 of the L2) of a memory-bound launch: its re-read bytes
      beyond the first read at most ``share`` (25 %) of the launch's DRAM bytes. Its re-reads are L2
      hits; what they cost is L2 → SM bandwidth, shared with the DRAM stream, so the rule bounds them
      against that stream.

    Why not 1.25x for the small operand: in a decode GEMV ``y = x·Wᵀ`` (``x (M, K)`` small, ``W
    (N, K)`` read once from DRAM) with ``P >= #SMs`` programs, each program owns a block of output
    features and a slice of ``K``; ``x`` is read once per output block (``G`` blocks), so ``x`` read
    ``<= 1.25x`` needs ``G = 1``: a K-only split over ``P`` programs writing ``P·M·N`` fp32 partials
    (at ``4096², M = 16``: 34 MB of partials against 18.9 MB of compressed weights). Re-reads and
    partials trade as ``(G·|x|)·(S·M·N·4) = P·8·M²·N·K``: the 1.25x rule is infeasible for such a
    launch, and the budget bounds the re-read traffic against the DRAM stream instead. (The old
    design, ``x`` read 128x at ``4096², M = 16``: 16.6 MB of re-reads against 19.1 MB of DRAM bytes,
    87 %: it fails.)"""
    worst = None   # (excess over the limit, figure text)
    for e in row["detail"]:
        # exempt only launches bound by their tensor-core FLOPs: a streaming launch bound by
        # instruction issue still pays its re-reads in L2 bandwidth once its issue is cut
        mem_bound = e["bound"] in ("dram", "l2", "issue")
        dram = float(e.get("dram_bytes") or 0.0)
        for name, t in e["tensors"].items():
            if not t["load"] or t["size"] < STREAMED or not t["reread"]:
                continue
            where = f"{e['kernel']}({e['phase']}).{name.split('/')[0]}"
            if mem_bound and t["size"] <= device.l2_bytes * L2_RESIDENT_FRACTION:
                # what reaches L2: each load instruction's distinct 32-byte sectors (the model's L2
                # term); a CTA's warps loading the same words at once are one request (L1)
                l2 = t.get("l2_load", t["load"])
                extra = max(0.0, l2 - t["size"])
                frac = extra / dram if dram else (0.0 if not extra else float("inf"))
                cand = (frac / share, f"{where} re-read {extra / 1e6:.2f} MB beyond its first read "
                                      f"({l2 / t['size']:.1f}x its size through L2) = {100 * frac:.0f} % of "
                                      f"the launch's {dram / 1e6:.2f} MB DRAM bytes")
            elif mem_bound or t["size"] > device.l2_bytes / 2:
                cand = (t["reread"] / limit, f"{where} read {t['reread']:.1f}x its size")
            else:
                continue
            if worst is None or cand[0] > worst[0]:
                worst = cand
    ok = worst is None or worst[0] <= 1.0
    target = (f"<= {limit}x; L2-resident (<= 1/8 L2, memory-bound launch): re-reads <= "
              f"{100 * share:.0f} % of the launch's DRAM bytes")
    return ok, (worst[1] if worst else "no streamed re-read"), target


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
            # narrower loads pass where the lanes' words interleave so that every 32-byte sector an
            # access touches is used whole (bytes loaded >= 32 x the sectors touched)
            whole = (t.get("sector_eff") or 0.0) >= 1.0
            if t["load"] and t["load_access"] and t["load_access"] < min_load and not whole:
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


#: the 2:4 decode kernels whose main loops the expansion budget reads (twice the inputs for the
#: sparse tensor-core decode's 3-bit codes, ``CODES3``: its loop runs two steps), and the inputs a step of
#: each covers when its config does not say (``BLOCK_K``): the sparse tensor-core decode's 64
DECODE_KERNELS = {"sparse24.decode": None, "sparse24.decode_mma": 64}


def expansion(row: dict, device, limit: float = 0.05):
    """The 2:4 expansion's cost in the compiled sm_90 build of the chosen config (``attach_sass``):
    the main loop's instructions (one warp's static SASS, run once a step) per weight that warp
    covers in a step (``BLOCK_N·BLOCK_K / num_warps``; the sparse tensor-core decode's loop expands
    nothing, and is held to the same figure), at most ``limit``, for every decode launch of the
    row."""
    got = []
    for e in row["detail"]:
        f = e.get("sass")
        if e["kernel"] not in DECODE_KERNELS or not f:
            continue
        if "error" in f or not f.get("loop_instructions"):
            return False, f"{e['kernel']} {e['config_label']}: no main loop read", f"<= {limit} a weight"
        bk = e["config"].get("BLOCK_K") or DECODE_KERNELS[e["kernel"]] * (2 if e["constexprs"].get("CODES3") else 1)
        weights = e["constexprs"]["BLOCK_N"] * bk / e["config"].get("num_warps", 4)
        got.append((f["loop_instructions"] / weights, f["loop_instructions"], e["kernel"], e["config_label"]))
    if not got:
        return False, "no 2:4 decode launch in the row", f"<= {limit} a weight"
    ipw, n, kernel, label = max(got)
    return ipw <= limit, (f"{ipw:.3f} instructions a weight ({n} a warp and step, {kernel} {label}; "
                          f"compiled sm_90)"), f"<= {limit} a weight"


def attach_sass(row: dict, arch: int = 90) -> dict:
    """Compile (cached) and read the SASS of every launch of the row; facts under ``e['sass']``."""
    from .sass import jobs_for, read_launches

    todo = [e for e in row["detail"] if e.get("signature") and "sass" not in e]
    for e, f in zip(todo, read_launches(jobs_for(todo, arch))):
        e["sass"] = f
    return row


CHECKS = {"reread": reread, "fill": fill, "access": access, "flops": flops, "speedup": speedup, "sass": sass,
          "expansion": expansion}


def check(name: str, row: dict, device, **kw):
    if name not in CHECKS:
        raise ValueError(f"budget: expected one of {sorted(CHECKS)}, got {name!r}")
    return CHECKS[name](row, device, **kw)
