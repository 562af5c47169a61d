"""Lower-bound time model of ``fastfactor sol``: **predicted, not measured**.

The terms and device figures are ``kernels/_cost.py``'s, shared with the kernels' path choice
(``kernels.lowrank.choose_path`` predicts its candidate paths with the same functions).

One launch of ours (counted by :mod:`fastfactor.sol.count`), with ``P`` programs on a device of
``S`` SMs, ``c`` programs resident per SM (1 unless a compiled build says more), ``w = ceil(P / (S·c))``
waves and the busy fraction ``f = min(1, P / (w·S))``::

    t = max( DRAM bytes / HBM bandwidth,
             32·sectors / (L2 bandwidth · f),          every load and store passes L2 -> SM
             issued dot FLOPs / (matrix rate · f) )    matrix rate x 0.6 for HMMA tiles
        + launch floor

and, where the compiled build of the launch was read (:func:`issue_term`, ``--sass``), a fourth
term, instruction issue::

    warp-instructions W = P · num_warps · (outside + loop · trips),   trips = ceil(reduction / BLOCK_K)
    t_issue = W / (S · 4 schedulers · 1 warp-instr/clk · clock · f)

with ``loop`` and ``outside`` the static SASS instructions of one warp in / out of the main loop
(:func:`fastfactor.sol.sass.loop_split`): an estimate (branches skipped in the epilogue still count).
Without SASS facts the issue term is left out and the launch says so (``issue['note']``), except
for kernels that register a stated per-instruction model (``kernels._cost.ISSUE_MODELS``: builds
whose products run on the FMA units, where issue can bound the launch): their term is always
there, and with ``--sass`` it is recounted from the compiled loops, each at the trip count the
model states (nested loops multiplied, :func:`nested_loop_instructions`).

Launches whose programs take roles that run in sequence (``kernels._cost.PHASE_MODELS``: the
dense-sparse two-role launch, consumers waiting for producers) add a term ``phases``: the phases'
seconds in sequence, each at the share of the device its programs occupy (a stated model).

DRAM bytes (the stated L2 model): a tensor read by the launch costs its unique bytes once; its
re-reads come from L2 when it fits in half the L2, else from DRAM (every requested byte). Stores
cost their bytes. A workspace the launch writes and then reads back itself (split partials summed
in the same launch, ``kernels._cost.IN_LAUNCH_WORKSPACE``) costs its stores only: the reads hit L2;
one the launch then drops from L2 unwritten (``kernels._cost.DISCARDS``) costs no DRAM bytes. HGMMA (wgmma) is assumed for dots whose M tile is at least 64 with a multiple of 4
warps (Triton's rule), HMMA otherwise.

A plain PyTorch op (dense ``F.linear``, the unfused path), recorded by
:func:`fastfactor.sol.record.record_torch_ops`, is modelled as ideal: a GEMM (``mm``, ``addmm``,
``bmm``, ``baddbmm``) costs ``max(bytes / HBM, FLOPs / matrix rate)`` with every operand moved
once (cuBLAS at the roofline); any other op moving data costs its input and output bytes over
HBM. Views cost nothing. Each op or launch adds the launch floor. PyTorch's semi-structured 2:4
path (cuSPARSELt) is modelled as the 2:4 GEMM at twice the dense matrix rate with the compressed
weight (values + 2-bit metadata) moved once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..kernels import _cost
from .device import Device

PREDICTED = "predicted, not measured"

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"}


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# the formulas and the device figures are shared with the kernels' path choice (one place)
rate_for = _cost.rate_for
fill = _cost.fill


def launch_time(count, device: Device, num_warps: int = 4, dtype: str = "bf16",
                ctas_per_sm: int = 1, hgmma: Optional[bool] = None, issue_instructions: float = 0.0) -> dict:
    """Predicted seconds of one counted launch, with each term (see the module docstring);
    ``issue_instructions``: the launch's warp-instructions from the kernel's stated
    per-instruction model (:data:`kernels._cost.ISSUE_MODELS`), an issue term."""
    dram = 0.0
    sectors = 0.0
    ws = _cost.IN_LAUNCH_WORKSPACE.get(count.kernel, ())
    disc = _cost.DISCARDS.get(count.kernel)
    dropped = ()
    if disc and any(n.split("/")[0] == disc[0] for n in count.tensors):
        dropped = disc[1:]              # its discard target is its own tensor: the launch discards
    for name, tc in count.tensors.items():
        if disc and name.split("/")[0] == disc[0]:
            continue                    # the discards: cache control, no bytes moved
        sectors += tc.load_sectors + tc.store_sectors
        if name.split("/")[0] in dropped:
            continue                    # summed, then dropped from L2 unwritten: no DRAM bytes
        if name.split("/")[0] in ws and tc.size_bytes <= device.l2_bytes / 2:
            dram += tc.store_bytes      # read back in the same launch: L2 hits
            continue
        uniq = tc.unique_bytes if tc.unique_bytes is not None else min(tc.load_bytes, tc.size_bytes)
        dram += _cost.dram_bytes(tc.load_bytes, uniq, tc.size_bytes, tc.store_bytes, device)
    if hgmma is None:
        hgmma = count.dot_m >= 64 and num_warps % 4 == 0
    t = _cost.kernel_seconds(dram, 32.0 * sectors, count.dot_flops, count.programs, device, bool(hgmma),
                             dtype, ctas_per_sm, issue_instructions)
    return dict(t, dram_bytes=dram, l2_bytes=32.0 * sectors, hgmma=bool(hgmma))


#: kernels whose main loop steps by another tuned block than ``BLOCK_K`` (the 2:4 dx-decode reduces
#: over weight rows, ``BLOCK_N`` per step)
REDUCTION_STEP = {"sparse24.dx_decode": "BLOCK_N"}

NO_SASS = "issue term not computed: no SASS facts for this launch (no build read; run with --sass)"
STATED_MODEL = ("issue term from the kernel's stated per-instruction model (kernels._cost.ISSUE_MODELS); "
                "--sass counts the compiled loops instead")


def nested_loop_instructions(facts: dict, trips: list) -> Optional[int]:
    """Per-warp instructions of a build whose loops (``facts['loops']``: ``[start, end, own
    instructions]``, address order) run ``trips[i]`` times per entry, nested loops multiplied by
    their enclosing loops' trips; None when the build has another number of loops."""
    loops = facts.get("loops")
    if loops is None or len(loops) != len(trips):
        return None
    total = int(facts["loop_instructions"]) + int(facts["outside_instructions"])
    per_warp = total - sum(int(l[2]) for l in loops)
    for i, (lo, hi, own) in enumerate(loops):
        n = trips[i]
        for j, (lo2, hi2, _) in enumerate(loops):
            if j != i and lo2 <= lo and hi <= hi2:
                n *= trips[j]
        per_warp += int(own) * n
    return per_warp


def issue_term(e: dict, facts: Optional[dict], device: Device) -> dict:
    """Instruction-issue seconds of one evaluated launch ``e`` (``evaluate_launch``: programs,
    reduction, config, fill) from the SASS facts of its build. Returns ``{'seconds': None, 'note':
    ...}`` when the facts are missing, failed or carry no loop split."""
    if not facts or "error" in facts or "loop_instructions" not in facts:
        why = (facts or {}).get("error")
        return dict(seconds=None, note=NO_SASS + (f" (build failed: {why})" if why else ""))
    cfg = e["config"]
    warps = int(cfg.get("num_warps", 4))
    step = cfg.get(REDUCTION_STEP.get(e.get("kernel"), "BLOCK_K")) or cfg.get("BLOCK_R")
    loop, outside = int(facts["loop_instructions"]), int(facts["outside_instructions"])
    if e.get("issue_model"):
        # a kernel with a stated loop structure (FMA builds): every compiled loop at its trip count
        per_warp = nested_loop_instructions(facts, e["issue_model"])
        if per_warp is not None:
            w = float(e["programs"]) * warps * per_warp
            rate = device.sms * device.issue_slots_per_sm * device.clock_hz * e["fill"]
            return dict(seconds=w / rate, warp_instructions=w, per_warp=per_warp, loop=loop, outside=outside,
                        trips=e["issue_model"], warps=warps,
                        note=f"every SASS loop at its trips {e['issue_model']} (nested loops multiplied)")
    if loop and step and e.get("reduction"):
        trips = math.ceil(e["reduction"] / step)
        note = f"trips = ceil({e['reduction']} / {step})"
    else:
        trips = 1 if loop else 0
        note = "main loop counted once (no reduction/BLOCK_K known)" if loop else "no loop in the SASS"
    per_warp = outside + loop * trips
    w = float(e["programs"]) * warps * per_warp
    rate = device.sms * device.issue_slots_per_sm * device.clock_hz * e["fill"]
    return dict(seconds=w / rate, warp_instructions=w, per_warp=per_warp, loop=loop, outside=outside,
                trips=trips, warps=warps, note=note)


def apply_issue(e: dict, facts: Optional[dict], device: Device) -> dict:
    """Add the issue term to an evaluated launch: ``terms['issue']``, ``bound`` and ``seconds``
    (= max of the terms + launch floor) updated; ``e['issue']`` keeps the figures or the note."""
    it = issue_term(e, facts, device)
    e["issue"] = it
    if it["seconds"] is None:
        e["terms"].pop("issue", None)
    else:
        e["terms"]["issue"] = it["seconds"]
    e["bound"] = max(e["terms"], key=e["terms"].get)
    e["seconds"] = e["terms"][e["bound"]] + device.launch_s
    return e


#: PyTorch's semi-structured 2:4 GEMMs (CUTLASS): ``(bias,) packed (N, K/2), meta, dense (K, M)``
_SEMI = {"_sparse_semi_structured_mm": 0, "_sparse_semi_structured_addmm": 1}


def torch_op_time(op, device: Device) -> Optional[dict]:
    """Predicted seconds of one aten op (None for views and allocations). PyTorch's 2:4 GEMMs
    (``_sparse_semi_structured_mm``/``addmm``, what our ``torch`` path and ``F.linear`` on a
    semi-structured tensor call) are modelled by :func:`semi_structured_time`, the torch24
    baseline's own formula."""
    if op.is_view:
        return None
    if op.name in _SEMI:
        first = _SEMI[op.name]
        (packed, pdt, _), (dense, _, _) = op.inputs[first], op.inputs[first + 2]
        n, k, m = packed[0], 2 * packed[1], dense[1]
        t = semi_structured_time(m, k, n, _esize(pdt), bool(first), device)
        return dict(t, bound="mma" if t["flops"] / device.bf16_rate > t["bytes"] / device.hbm_bw else "dram",
                    name=op.name)
    ins = [(s, d) for s, d, _ in op.inputs]
    outs = [(s, d) for s, d, _ in op.outputs]
    nbytes = sum(_numel(s) * _esize(d) for s, d in ins + outs)
    if op.name in ("zeros", "new_zeros", "zeros_like", "fill", "zero"):
        nbytes = sum(_numel(s) * _esize(d) for s, d in outs)
    flops = 0.0
    if op.name in _GEMMS and outs:
        mats = [s for s, _ in ins if len(s) >= 2]
        if len(mats) >= 2:
            a, b = mats[-2], mats[-1]
            if op.name == "linear":   # F.linear(x (..., K), w (N, K), b): w is (out, in), not (K, N)
                a, b = mats[0], mats[1]
                flops = 2.0 * _numel(a[:-1]) * a[-1] * b[0]
            else:
                batch = _numel(a[:-2]) if len(a) > 2 else 1
                flops = 2.0 * batch * a[-2] * a[-1] * b[-1]
    if nbytes == 0 and flops == 0:
        return None
    dt = "fp32" if any(d == torch.float32 for _, d in ins) else "bf16"
    t = _cost.library_seconds(nbytes, flops, device, dt)
    return dict(seconds=t["seconds"], bytes=nbytes, flops=flops, bound=t["bound"], name=op.name)


def torch_path_time(ops, device: Device) -> dict:
    times = [t for t in (torch_op_time(o, device) for o in ops) if t is not None]
    return dict(seconds=sum(t["seconds"] for t in times), launches=len(times),
                bytes=sum(t["bytes"] for t in times), flops=sum(t["flops"] for t in times), ops=times)


def semi_structured_time(M: int, K: int, N: int, elem: int, bias: bool, device: Device) -> dict:
    """PyTorch's 2:4 ``F.linear`` (cuSPARSELt), forward, modelled as ideal (module docstring)."""
    wbytes = N * K // 2 * elem + N * K // 8  # kept values + 2-bit indices
    nbytes = elem * M * (K + N) + wbytes + (N * elem if bias else 0)
    flops = 2.0 * M * N * K / 2  # half the products, at twice the dense rate below
    t = max(nbytes / device.hbm_bw, flops / device.bf16_rate)
    return dict(seconds=t + device.launch_s, bytes=nbytes, flops=flops)
