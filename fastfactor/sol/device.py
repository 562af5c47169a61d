"""Device figures of the lower-bound model (``fastfactor sol``). Every figure says where it comes from.

``hbm_bw`` and ``bf16_rate`` are the *achievable* ceilings the model divides by (a measured copy
and a measured 8192³ bf16 matmul where this workplace has measured them, else the same fraction of
the datasheet). ``l2_bw`` (L2 → SM) is a lead, not a measurement: replace it with the figure
``python -m fastfactor.gpu_check`` measures on the first GPU. ``hmma_fraction`` is the share of the
wgmma (HGMMA) rate that warp-level ``mma.sync`` (HMMA) reaches on Hopper (a lead: Triton tiles with
``BLOCK_M < 64`` or fewer than 4 warps compile to HMMA).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Device:
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
    sources: tuple = ()


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
        "L2->SM 9 TB/s, HMMA 0.6, launch 2.5 us: leads, as for the H200",
        "issue: 4 schedulers/SM x 1 warp-instr/clk at 1.98 GHz max boost (Hopper whitepaper, H100 SXM datasheet)",
    ),
)

DEVICES = {"h200": H200, "h100": H100}


def get_device(name: str) -> Device:
    key = name.lower().replace("-sxm", "")
    if key not in DEVICES:
        raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {name!r}")
    return DEVICES[key]
