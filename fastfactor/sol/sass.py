"""Read the compiled kernel of a recorded launch: the exact specialization Triton's runtime builds
(integers equal to 1 as constants, ``tt.divisibility = 16`` where the recorder saw it), compiled
ahead of time for sm_90 / sm_80 and disassembled with the ``cuobjdump`` of Triton's package.

Per build: registers, stack frame (spill), shared memory, resulting occupancy (programs per SM),
and SASS counts: ``HGMMA`` (wgmma) against ``HMMA``, 16-byte global loads (``LDG.E.128``,
``LDGSTS.E.BYPASS.128``) against 2-byte ones (``LDG.E.U16``), TMA (``UTMALDG``), scalar 2-byte
stores (``STG.E.U16``), local memory (``LDL``/``STL``), barriers (``BAR``), total instructions.
Builds are cached on disk by (kernel source, signature, specialization, config, target).

Compiling needs the kernels *not* interpreted: :func:`read_launches` runs the compiles in a child
process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

PATTERNS = {
    "hgmma": r"\bHGMMA\b", "hmma": r"\bHMMA\b", "hmma_sp": r"\bHMMA\.SP\b", "ldg128": r"\bLDG\.E\.128\b|\bLDG\.E\.EL\.128\b",
    "ldgsts128": r"\bLDGSTS\.E(\.\w+)*\.128\b", "ldg_u16": r"\bLDG\.E\.U16\b", "ldg_u8": r"\bLDG\.E\.U8\b",
    "utmaldg": r"\bUTMALDG\b", "stg_u16": r"\bSTG\.E\.U16\b", "ldl": r"\bLDL\b", "stl": r"\bSTL\b",
    "bar": r"\bBAR\.", "instructions": r"^\s+/\*[0-9a-f]{4,}\*/\s+\S",
}


def _cuobjdump() -> Optional[str]:
    from .._cubin import find_cuobjdump

    return find_cuobjdump()


def sass_counts(sass: str) -> dict:
    out = {k: len(re.findall(p, sass, flags=re.M)) for k, p in PATTERNS.items()}
    out.update(loop_split(sass))
    return out


_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", re.M)
_BRA = re.compile(r"\bBRA\b(?:\.\w+)*\s+(?:`\()?0x([0-9a-f]+)")


def loop_split(sass: str) -> dict:
    """Instructions of the main loop against the rest (one warp's static SASS, ``NOP`` padding and
    the closing self-branch left out). Loops are backward ``BRA`` ranges ``[target, branch]``; the
    main loop is the one holding the most ``HGMMA``/``HMMA`` (the longest when no loop has any).
    ``loop_instructions`` is 0 when the kernel has no backward branch."""
    ins = [(int(a, 16), t.strip()) for a, t in _LINE.findall(sass)]
    ins = [(a, t) for a, t in ins if not re.match(r"^NOP\b", t)]
    loops = []
    for a, t in ins:
        m = _BRA.search(t)
        if m and int(m.group(1), 16) < a:
            loops.append((int(m.group(1), 16), a))
    real = [(a, t) for a, t in ins if not (_BRA.search(t) and int(_BRA.search(t).group(1), 16) == a)]
    best, key = None, None
    for lo, hi in loops:
        body = [t for a, t in real if lo <= a <= hi]
        k = (sum(1 for t in body if re.search(r"\b(HGMMA|HMMA)\b", t)), len(body))
        if key is None or k > key:
            best, key = (lo, hi), k
    n_loop = key[1] if key else 0
    # every loop, address order, with its own instructions (those of loops nested in it excluded)
    spans = sorted(set(loops))
    own = []
    for lo, hi in spans:
        inner = [(a, b) for a, b in spans if (a, b) != (lo, hi) and lo <= a and b <= hi]
        own.append([lo, hi, sum(1 for a, t in real if lo <= a <= hi and not any(x <= a <= y for x, y in inner))])
    return dict(loop_instructions=n_loop, outside_instructions=len(real) - n_loop,
                loop_range=[best[0], best[1]] if best else None, loops=own)


def occupancy(regs: int, smem: int, num_warps: int, regs_per_sm: int = 65536,
              smem_per_sm: int = 233472, max_warps: int = 64) -> int:
    """Programs resident per SM from registers, shared memory and warps."""
    threads = 32 * num_warps
    by_regs = regs_per_sm // max(1, regs * threads) if regs else 32
    by_smem = smem_per_sm // smem if smem else 32
    return max(0, min(by_regs, by_smem, max_warps // num_warps, 32))


def build_one(job: dict) -> dict:
    """Compile one specialization (in a process where the kernels are not interpreted)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .._cubin import resource_usage as _resource_usage
    from ..kernels import _config

    fn = _config.KERNELS[job["kernel"]].fn  # every family's kernel module is imported with fastfactor
    sig = dict(job["signature"])
    consts = dict(job["constexprs"])
    consts.update({k: v for k, v in job["config"].items() if k not in ("num_warps", "num_stages")})
    for name, s in job["specialization"].items():
        if s == "1" and name in sig and not sig[name].startswith("*"):
            consts[name] = 1
    for k in consts:
        sig[k] = "constexpr"
    ordered = {n: sig[n] for n in fn.arg_names if n in sig}
    for n in fn.arg_names:
        ordered.setdefault(n, "constexpr")
        if ordered[n] == "constexpr" and n not in consts:
            consts[n] = None
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if job["specialization"].get(n) == "D" and ordered[n] != "constexpr"}
    src = triton.compiler.ASTSource(fn=fn, signature=ordered, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                       options={"num_warps": job["config"].get("num_warps", 4),
                                "num_stages": job["config"].get("num_stages", 2)})
    tool = _cuobjdump()
    out = dict(kernel=job["kernel"], arch=job["arch"], shared=int(c.metadata.shared))
    out.update(_resource_usage(c.asm["cubin"], tool))
    if tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(c.asm["cubin"])
            path = f.name
        try:
            sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, timeout=120).stdout
        finally:
            os.unlink(path)
        out.update(sass_counts(sass))
        out["global_mnemonics"] = sorted(set(re.findall(r"\b(LDG\.[.\w]*|LDGSTS\.[.\w]*|STG\.[.\w]*|UTMALDG[.\w]*)", sass)))
    nw = job["config"].get("num_warps", 4)
    out["ctas_per_sm"] = occupancy(out.get("regs", 0), out["shared"], nw)
    return out


def _key(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:32]


def gpu_build(e: dict) -> tuple:
    """``(constexprs, signature)`` of the build a GPU runs for a launch recorded under the
    interpreter: a split decode's tiles (and the Monarch row-block kernel's split stage 1,
    ``KSPLIT``, and its weight gradients' row splits, ``SPLIT_A``/``SPLIT_B``) are reduced by their
    last arrival on an int32 counter (``SYNC``) only on a GPU; the interpreter runs programs in
    order and passes no counters."""
    cx, sig = dict(e["constexprs"]), dict(e["signature"])
    if any(cx.get(k) for k in ("SPLIT", "KSPLIT", "SPLIT_A", "SPLIT_B")) and "SYNC" in cx:
        cx["SYNC"] = True
        if "cnt_ptr" in sig:
            sig["cnt_ptr"] = "*i32"
    return cx, sig


def jobs_for(detail: list, arch: int = 90) -> list:
    """Compile jobs for the chosen configs of a row's launches (``evaluate_row(...)['detail']``), as
    a GPU would build them (:func:`gpu_build`)."""
    jobs = []
    for e in detail:
        if not e.get("signature"):
            continue
        cx, sig = gpu_build(e)
        jobs.append(dict(kernel=e["kernel"], signature=sig, constexprs=cx, specialization=e["specialization"],
                         config=e["config"], arch=arch, src=e.get("source_hash", "")))
    return jobs


def read_launches(jobs: list, cache_dir: Optional[str] = None, timeout: int = 1200) -> list:
    """SASS facts per job (cached on disk); compiles the misses in one child process."""
    from .rows import _cache_dir

    cdir = os.path.join(cache_dir or _cache_dir(), "sass")
    os.makedirs(cdir, exist_ok=True)
    results, todo = [None] * len(jobs), []
    for i, j in enumerate(jobs):
        p = os.path.join(cdir, _key(j) + ".json")
        cached = None
        if os.path.exists(p):
            with open(p) as f:
                cached = json.load(f)
        if cached is not None and not ("instructions" in cached and "loop_instructions" not in cached):
            results[i] = cached  # (a build cached before the loop split is read again)
        else:
            todo.append(i)
    if todo:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        p = subprocess.run([sys.executable, "-m", "fastfactor.sol.sass"], input=json.dumps([jobs[i] for i in todo]),
                           capture_output=True, text=True, env=env, timeout=timeout)
        try:
            built = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"sass: the compile child failed: {p.stderr[-2000:]}") from None
        for i, r in zip(todo, built):
            results[i] = r
            if "error" not in r:
                with open(os.path.join(cdir, _key(jobs[i]) + ".json"), "w") as f:
                    json.dump(r, f)
    return results


def _child() -> int:
    jobs = json.loads(sys.stdin.read())
    out = []
    for j in jobs:
        try:
            out.append(build_one(j))
        except Exception as e:  # noqa: BLE001 - reported per build
            out.append(dict(kernel=j["kernel"], error=f"{type(e).__name__}: {str(e)[:300]}"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
