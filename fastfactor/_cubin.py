"""Reading compiled Triton kernels: the ``cuobjdump`` Triton ships, and a cubin's resource usage
(registers, stack frame = spill, local memory). Shared by ``compile-check`` and ``fastfactor sol``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional


def find_cuobjdump() -> Optional[str]:
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes, tool: Optional[str]) -> dict:
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    finally:
        os.unlink(path)
    res = {}
    m = re.search(r"REG:(\d+)", out)
    if m:
        res["regs"] = int(m.group(1))
    # register spills land in the per-thread stack frame
    m = re.search(r"STACK:(\d+)", out)
    if m:
        res["spill"] = int(m.group(1))
    m = re.search(r"LOCAL:(\d+)", out)
    if m:
        res["local"] = int(m.group(1))
    return res
