"""The one lower-bound time model shared by the kernels' path choice and ``fastfactor sol``.

**Predicted, not measured.** ``fastfactor sol`` (:mod:`fastfactor.sol.model`) applies these terms
to launches counted exactly under the interpreter; the launchers' ``choose_path`` functions
(``kernels/lowrank.py``) apply the *same* terms, with the *same* device figures, to launches
counted analytically from the shapes. One place for the constants and the formulas, so that the
dispatcher and the model that judges it cannot disagree. (The kernels are the bottom layer of the
package: ``fastfactor.sol.device`` re-exports :class:`Device`, :data:`H200`, :data:`H100` from
here.)

A kernel launch of ours with ``P`` programs on ``S`` SMs (``c`` programs resident per SM),
``w = ceil(P / (S·c))`` waves, busy fraction ``f = min(1, P / (w·S))``::

    t = max( DRAM bytes / HBM bandwidth,
             L2 bytes / (L2 bandwidth · f),          every load and store passes L2 -> SM
             issued dot FLOPs / (matrix rate · f) )  matrix rate x hmma_fraction for HMMA tiles
        + launch floor

DRAM bytes (the L2 model): a tensor read by the launch costs its unique bytes once when it fits in
half the L2, else every byte requested; stores cost their bytes (:func:`dram_bytes`).

Plans that trade L2 traffic against DRAM bytes (the 2:4 decode kernels' row tiles and splits) are
priced at the nominal L2 figure and at the low end of its range and chosen by :func:`robust_pick`.

A library GEMM (cuBLAS ``mm``/``addmm``) is modelled as ideal: ``max(bytes / HBM, FLOPs / matrix
rate) + launch floor`` with every operand moved once; any other library op moving data costs its
bytes over HBM plus the launch floor (:func:`library_seconds`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os


@dataclasses.dataclass(frozen=True)
class Device:
    """Device figures of the lower-bound model. Every figure says where it comes from (``sources``).

    ``hbm_bw`` and ``bf16_rate`` are the *achievable* ceilings the model divides by (a measured copy
    and a measured 8192³ bf16 matmul where this workplace has measured them, else the same fraction
    of the datasheet). ``l2_bw`` (L2 → SM) is a lead, not a measurement: replace it with the figure
    ``python -m fastfactor.gpu_check`` measures on the first GPU. ``hmma_fraction`` is the share of
    the wgmma (HGMMA) rate that warp-level ``mma.sync`` (HMMA) reaches on Hopper (a lead: Triton
    tiles with ``BLOCK_M < 64`` or fewer than 4 warps compile to HMMA)."""

    name: str
    sms: int
    hbm_bw: float          # bytes/s, achievable
    l2_bytes: int
    l2_bw: float           # bytes/s, L2 -> SMs, achievable (lead)
    bf16_rate: float       # dense bf16/fp16 tensor FLOP/s, achievable
    tf32_rate: float       # dense tf32 tensor FLOP/s
    hmma_fraction: float   # HMMA (mma.sync) share of the HGMMA rate
    launch_s: float        # per-kernel floor inside a CUDA graph
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472   # 228 KiB usable per SM on sm_90 (CUDA programming guide, 9.0)
    max_ctas_per_sm: int = 32
    # instruction issue: 4 warp schedulers (SM sub-partitions) per SM, each issuing 1 warp-instruction
    # per clock (Hopper whitepaper, "H100 SM architecture": four processing blocks, each with its own
    # warp scheduler and dispatch unit, 1 warp/clk); clock: boost clock of the SXM parts, 1980 MHz
    # (H100 SXM5: Hopper whitepaper table 3 "GPU Boost Clock 1830 MHz for H100 SXM5 ... not finalized",
    # NVIDIA H100/H200 datasheets list max boost 1980 MHz; nvidia-smi -q "Max Clocks SM 1980 MHz")
    issue_slots_per_sm: int = 4
    clock_hz: float = 1.98e9
    # low end of the L2 -> SM lead's range: the planners that trade L2 re-reads against DRAM bytes
    # choose plans that hold up there too (robust_pick); replace both with the measured figure
    l2_bw_low: float = 5.5e12
    sources: tuple = ()
    #: where the figures come from: ``"leads"`` (this module's constants) or the gpu-check file
    #: they were measured into (:func:`calibrated`)
    figures: str = "leads"


H200 = Device(
    name="H200", sms=132,
    hbm_bw=4.3e12, l2_bytes=60 * 10**6, l2_bw=9.0e12,
    bf16_rate=790e12, tf32_rate=395e12, hmma_fraction=0.6, launch_s=2.5e-6,
    sources=(
        "SMs 132, L2 60 MB: torch.cuda.get_device_properties on an H200 of this workplace (device/KINDS.md, 2026-10-28)",
        "HBM 4.3 TB/s: device-to-device copy measured there (datasheet 4.8 TB/s)",
        "bf16 790 TFLOP/s: 8192^3 torch.matmul on random data measured there (769-798; datasheet ~990 dense)",
        "tf32: half the bf16 rate (datasheet ratio)",
        "L2->SM 9 TB/s: lead (microbenchmarks report 5.5-7 TB/s on H100 PCIe, 114 SMs, lower clocks); to be measured",
        "L2->SM low end 5.5 TB/s: the lowest of those microbenchmark figures, unscaled (plans are picked to hold up there)",
        "HMMA 0.6 of HGMMA: lead (mma.sync on Hopper); launch 2.5 us: CUDA-graph replay floor, lead",
        "issue: 4 schedulers/SM x 1 warp-instr/clk (Hopper whitepaper, SM processing blocks); "
        "clock 1.98 GHz max SM boost (H200 datasheet / nvidia-smi max clocks), not measured here",
    ),
)

H100 = Device(
    name="H100-SXM", sms=132,
    hbm_bw=3.0e12, l2_bytes=50 * 2**20, l2_bw=9.0e12,
    bf16_rate=790e12, tf32_rate=395e12, hmma_fraction=0.6, launch_s=2.5e-6,
    sources=(
        "SMs 132, L2 50 MiB, HBM3 3.35 TB/s, bf16 ~990 TFLOP/s dense: NVIDIA H100 SXM datasheet / Hopper whitepaper",
        "HBM 3.0 TB/s: 90 % of the datasheet, the measured/datasheet ratio of the H200 here",
        "bf16 790 TFLOP/s: same chip and clocks as the H200 measured here",
        "L2->SM 9 TB/s (low end 5.5), HMMA 0.6, launch 2.5 us: leads, as for the H200",
        "issue: 4 schedulers/SM x 1 warp-instr/clk at 1.98 GHz max boost (Hopper whitepaper, H100 SXM datasheet)",
    ),
)

DEVICES = {"h200": H200, "h100": H100}

# --------------------------------------------------------------------------------------------
# measured figures: a gpu-check run replaces the leads
# --------------------------------------------------------------------------------------------

#: path of a ``gpu-check.json`` (``python -m fastfactor.gpu_check``) whose measured ceilings replace
#: the figures of the device it ran on, for the dispatchers and ``fastfactor sol`` alike (read once,
#: when this module is imported; ``fastfactor sol --figures PATH`` sets it)
FIGURES_ENV = "FASTFACTOR_DEVICE_FIGURES"

#: Device field -> (the gpu-check ceilings that measure it, first found wins; factor to the field's unit)
CEILING_FIELDS = {
    "hbm_bw": (("copy_tbs",), 1e12),             # device-to-device copy, read + write bytes
    "bf16_rate": (("matmul_tflops",), 1e12),     # 8192^3 bf16 torch.matmul
    # L2 -> SM: gpu-check's probe kernel (16-byte loads cached in L2 only, 4 programs an SM, the
    # difference of two pass counts), else an L2-resident 16 MiB buffer summed 32 times by torch
    "l2_bw": (("l2_triton_tbs", "l2_read_tbs"), 1e12),
    "launch_s": (("launch_us",), 1e-6),          # one tiny kernel replayed in a CUDA graph (the rows' timing)
}


def calibrated(device: Device, ceilings: dict, origin: str) -> Device:
    """``device`` with the figures a GPU measured (``ceilings``: gpu-check's ``meta.ceilings``)
    in place of its leads; a figure gpu-check did not record keeps the lead.

    ``copy_tbs`` -> ``hbm_bw``; ``matmul_tflops`` -> ``bf16_rate`` (``tf32_rate`` scaled by the
    same factor: the datasheet ratio kept); ``l2_triton_tbs`` (else ``l2_read_tbs``) -> ``l2_bw``
    and ``l2_bw_low`` (a measured figure has no range: the planners' robust pick then takes the
    fastest plan at it); ``launch_us`` -> ``launch_s``. ``origin`` (the file) goes to
    :attr:`Device.figures` and the sources. Raises ``ValueError`` naming the ceiling when a figure
    is not a positive number."""
    changes, notes = {}, []
    for field, (keys, unit) in CEILING_FIELDS.items():
        for key in keys:
            if ceilings.get(key) is None:
                continue
            v = ceilings[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{origin}: ceilings.{key}: expected a positive number, got {v!r}")
            if field not in changes:
                changes[field] = float(v) * unit
                notes.append(f"{field} = {key} {v:.4g}")
    if "bf16_rate" in changes:
        changes["tf32_rate"] = device.tf32_rate * changes["bf16_rate"] / device.bf16_rate
    if "l2_bw" in changes:
        changes["l2_bw_low"] = changes["l2_bw"]
    if not changes:
        return device
    src = f"measured ({origin}): " + ", ".join(notes) + "; the other figures are the leads below"
    return dataclasses.replace(device, figures=origin, sources=(src,) + tuple(device.sources), **changes)


def read_figures(path: str) -> tuple:
    """``(device key, ceilings, origin)`` of a ``gpu-check.json``: the model device it ran as
    (``meta.model_device``), its measured ceilings and a label (file, GPU, commit, date). Raises
    ``ValueError`` naming the file and what is wrong: unreadable, not a gpu-check result, a dry run
    (CPU figures), an unknown device."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{FIGURES_ENV}: expected a gpu-check.json, could not read {path!r} ({e})") from None
    meta = doc.get("meta") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or not str(meta.get("schema", "")).startswith("fastfactor-gpu-check/"):
        raise ValueError(f"{FIGURES_ENV}: expected a gpu-check.json (meta.schema fastfactor-gpu-check/...), "
                         f"got {path!r} without it")
    if meta.get("dry"):
        raise ValueError(f"{FIGURES_ENV}: {path!r} is a dry run (CPU, tiny shapes): its figures are not a GPU's")
    key = str(meta.get("model_device", "")).lower()
    if key not in DEVICES:
        raise ValueError(f"{FIGURES_ENV}: {path!r}: meta.model_device: expected one of {sorted(DEVICES)}, "
                         f"got {meta.get('model_device')!r}")
    ceilings = meta.get("ceilings")
    if not isinstance(ceilings, dict):
        raise ValueError(f"{FIGURES_ENV}: {path!r}: meta.ceilings: expected the measured ceilings, got {ceilings!r}")
    origin = (f"{os.path.basename(path)}: {meta.get('device', '?')}, commit {str(meta.get('commit', '?'))[:12]}, "
              f"{meta.get('date', '?')}")
    return key, ceilings, origin


def _from_env() -> Device:
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return H200
    key, ceilings, origin = read_figures(path)
    DEVICES[key] = calibrated(DEVICES[key], ceilings, origin)
    return DEVICES[key]


#: the device the dispatchers predict with when they cannot know better (an H200 of this workplace,
#: or the device a gpu-check file named by ``FASTFACTOR_DEVICE_FIGURES`` measured, with its
#: figures; only ``sms`` is replaced by the real device's SM count)
DEFAULT = _from_env()


def rate_for(dtype: str, device: Device, hgmma: bool = True) -> float:
    """Tensor-core FLOP/s for ``dtype`` (``'fp32'``/``'tf32'`` at the TF32 rate, else bf16/fp16)."""
    r = device.tf32_rate if dtype in ("fp32", "tf32") else device.bf16_rate
    return r if hgmma else r * device.hmma_fraction


def fill(programs: int, device: Device, ctas_per_sm: int = 1) -> tuple[int, float]:
    """``(waves, busy fraction)`` of a launch of ``programs`` programs."""
    slots = device.sms * max(1, ctas_per_sm)
    waves = max(1, math.ceil(programs / slots))
    return waves, min(1.0, programs / (waves * device.sms))


#: ``kernel -> workspace arguments`` a launch writes and then reads back itself (fp32 split
#: partials summed by a program of the same launch): those reads are L2 hits (the bytes were
#: written moments before and fit the L2), so only the stores cost DRAM bytes
IN_LAUNCH_WORKSPACE = {"sparse24.decode": ("ws_ptr",), "sparse24.decode_mma": ("ws_ptr",), "sparse24.dx_decode": ("ws_ptr",),
                       "sparse24.ds_rank_split": ("ws_ptr",), "sparse24.ds_bwd_dense": ("ws_ptr",), "sparse24.ds_roles": ("t_ptr", "ws_ptr"),
                       "monarch.rows": ("ws_ptr",), "monarch.rows_fp16": ("ws_ptr",)}


#: ``kernel -> (discard argument, workspace)``: launches whose split reducer drops the summed
#: partials from L2 without writing them back (``kernels._split._split_discard``, PTX
#: ``discard.global.L2``; a hint, which the model takes as honoured). Where a launch discards (its
#: discard argument is a tensor of its own: the interpreter's shadow, ``kernels._split.discard_target``;
#: otherwise it aliases the workspace and keeps its name), its workspace costs no DRAM bytes (its L2
#: traffic stays), and the discard argument costs nothing (cache control moves no data)
DISCARDS = {"sparse24.decode_mma": ("wsd_ptr", "ws_ptr")}


def dram_bytes(load_bytes: float, unique_bytes: float, size_bytes: float, store_bytes: float,
               device: Device) -> float:
    """DRAM bytes of one tensor in one launch (the L2 model of the module docstring)."""
    dram = 0.0
    if load_bytes:
        uniq = min(unique_bytes, load_bytes)
        dram += uniq if size_bytes <= device.l2_bytes / 2 else load_bytes
    return dram + store_bytes


def kernel_seconds(dram: float, l2: float, dot_flops: float, programs: int, device: Device,
                   hgmma: bool, dtype: str = "bf16", ctas_per_sm: int = 1,
                   issue_instructions: float = 0.0) -> dict:
    """Predicted seconds of one launch of ours from its DRAM bytes, L2 bytes (32 x sectors), issued
    dot FLOPs and programs, with each term (module docstring); ``issue_instructions`` (warp-
    instructions of the whole launch, from an :data:`ISSUE_MODELS` model) adds the issue term."""
    waves, f = fill(programs, device, ctas_per_sm)
    terms = {
        "dram": dram / device.hbm_bw,
        "l2": l2 / (device.l2_bw * f),
        "mma": dot_flops / (rate_for(dtype, device, hgmma) * f) if dot_flops else 0.0,
    }
    if issue_instructions:
        terms["issue"] = issue_seconds(issue_instructions, device, f)
    bound = max(terms, key=terms.get)
    return dict(seconds=terms[bound] + device.launch_s, bound=bound, terms=terms, waves=waves, fill=f)


def robust_pick(candidates):
    """The plan to launch when plans trade L2 traffic against DRAM bytes and the L2 -> SM figure is
    a lead (:attr:`Device.l2_bw`, unmeasured). ``candidates``: ``(t_nominal, t_low, plan)`` with each
    plan's predicted seconds at the nominal L2 bandwidth and at the low end of its range
    (:attr:`Device.l2_bw_low`). Returns the candidate whose worst ratio to the best plan at either
    figure is least (minimax regret), ties to the faster at the nominal figure, then to the first::

        pick = argmin_p max(t_nom(p) / min t_nom, t_low(p) / min t_low)

    A plan that wins by 3 % at 9 TB/s and loses by 25 % at 5.5 TB/s is not taken over one that is
    3 % slower at 9 and the fastest at 5.5: the first GPU measurement decides between them."""
    cands = list(candidates)
    if not cands:
        raise ValueError("candidates: expected at least one plan, got none")
    best_nom = min(c[0] for c in cands)
    best_low = min(c[1] for c in cands)
    return min(cands, key=lambda c: (round(max(c[0] / best_nom, c[1] / best_low), 9), c[0]))


def library_seconds(nbytes: float, flops: float, device: Device, dtype: str = "bf16") -> dict:
    """Predicted seconds of one library op (cuBLAS GEMM at the roofline, or a memory-bound op)."""
    t_mem = nbytes / device.hbm_bw
    t_mma = flops / rate_for(dtype, device) if flops else 0.0
    return dict(seconds=max(t_mem, t_mma) + device.launch_s, bound="mma" if t_mma > t_mem else "dram")


# --------------------------------------------------------------------------------------------
# instruction issue of kernels without tensor-core products (stated per-instruction models)
# --------------------------------------------------------------------------------------------

#: ``kernel name -> fn(ints, constexprs, config, grid) -> (warp-instructions per program, loop
#: trips) or None``: kernels whose products run on the FMA units register a per-instruction model
#: (calibrated on their compiled SASS, stated where they register it). ``fastfactor sol`` adds its
#: issue term to such launches even without ``--sass``; ``loop trips`` (one per backward-branch
#: loop of the SASS, in address order) let ``--sass`` count the compiled loops with their real trip
#: counts. The dispatchers price the same launches with the same functions.
ISSUE_MODELS: dict = {}

#: ``kernel name -> fn(ints, constexprs, config, device, dtype) -> seconds or None``: launches whose
#: programs take roles that run in sequence (consumers wait for producers) register the seconds of
#: their phases in sequence (a stated model, each phase at the share of the device its programs
#: occupy); ``fastfactor sol`` adds it as a term of such launches (``phases``), the dispatchers
#: price the same launches with the same functions.
PHASE_MODELS: dict = {}


def issue_seconds(warp_instructions: float, device: Device, fill_fraction: float = 1.0) -> float:
    """Seconds to issue ``warp_instructions`` on ``device`` (4 schedulers x 1 warp-instruction per
    clock per SM, busy fraction ``fill_fraction``)."""
    rate = device.sms * device.issue_slots_per_sm * device.clock_hz * max(fill_fraction, 1e-9)
    return warp_instructions / rate
