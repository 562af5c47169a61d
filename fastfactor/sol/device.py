"""Device figures of the lower-bound model (``fastfactor sol``), defined in ``kernels/_cost.py``
(shared with the kernels' ``choose_path``). Every figure says where it comes from.

``hbm_bw`` and ``bf16_rate`` are the *achievable* ceilings the model divides by (a measured copy
and a measured 8192³ bf16 matmul where this workplace has measured them, else the same fraction of
the datasheet). ``l2_bw`` (L2 → SM) is a lead, not a measurement: replace it with the figure
``python -m fastfactor.gpu_check`` measures on the first GPU. ``hmma_fraction`` is the share of the
wgmma (HGMMA) rate that warp-level ``mma.sync`` (HMMA) reaches on Hopper (a lead: Triton tiles with
``BLOCK_M < 64`` or fewer than 4 warps compile to HMMA).
"""

from __future__ import annotations

# The figures live with the kernels (the bottom layer), so that the dispatchers' path choice and
# this model predict with the same constants: ``kernels/_cost.py``.
from ..kernels._cost import DEVICES, H100, H200, Device  # noqa: F401


def get_device(name: str) -> Device:
    key = name.lower().replace("-sxm", "")
    if key not in DEVICES:
        raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {name!r}")
    return DEVICES[key]
