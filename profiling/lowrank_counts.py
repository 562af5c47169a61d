"""Exact per-launch counts of the low-rank op under the Triton interpreter, with the GPU configs
that deterministic mode launches on a 132-SM device (H100/H200). A stopgap until ``fastfactor sol``
(issue 12) lands; numbers, not timings:

    PYTHONPATH=$PWD python profiling/lowrank_counts.py --rows decode            # M = 16, d = 4096, 8192
    PYTHONPATH=$PWD python profiling/lowrank_counts.py --rows wgrad             # d = 768, M = 16384 backward

Per launch: kernel, grid programs, bytes requested per tensor argument by loads (masked-off elements
excluded) and their multiple of the tensor's size, bytes stored, and ``tl.dot`` FLOPs issued.
Values computed are meaningless (bf16 dots are not upcast once the GPU configs are forced); only
the traffic is. Runs any checkout of the repository (before/after comparisons).
"""

import argparse
import collections
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["FASTFACTOR_CPU_BACKEND"] = "triton"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter as I  # noqa: E402

import fastfactor  # noqa: E402
from fastfactor.kernels import _config  # noqa: E402
from fastfactor.kernels import lowrank as K  # noqa: E402

LAUNCHES = []
_cur = {}


def _ranges(names, args):
    out = []
    for n, a in zip(names, args):
        if isinstance(a, torch.Tensor) and a.numel():
            base = a.untyped_storage().data_ptr()
            out.append((n, base, base + a.untyped_storage().nbytes(), a.element_size(), a))
    return out


_orig_call = I.GridExecutor.__call__


def _call(self, *args, **kwargs):
    names = list(self.fn.__code__.co_varnames[: self.fn.__code__.co_argcount])
    rec = dict(kernel=self.fn.__name__, loads=collections.Counter(), stores=collections.Counter(),
               flops=0.0, programs=0, sizes={})
    orig_init = self._init_args_hst

    def init(args_dev, kw):
        ah, kh = orig_init(args_dev, kw)
        allargs = list(ah) + [kh[n] for n in names[len(ah):] if n in kh]
        rec["ranges"] = _ranges(names, allargs)
        for n, lo, hi, es, t in rec["ranges"]:
            rec["sizes"].setdefault(n, t.numel() * t.element_size())
        return ah, kh

    self._init_args_hst = init
    grid = self.grid
    _cur["rec"] = rec
    try:
        _orig_call(self, *args, **kwargs)
    finally:
        self._init_args_hst = orig_init
    g = I.interpreter_builder.grid_dim
    rec["programs"] = int(np.prod(g))
    rec.pop("ranges", None)
    LAUNCHES.append(rec)


def _owner(addrs):
    rec = _cur["rec"]
    a = int(addrs.min())
    for n, lo, hi, es, t in rec["ranges"]:
        if lo <= a < hi:
            return n
    return "?"


_ol, _os, _od = I.InterpreterBuilder.create_masked_load, I.InterpreterBuilder.create_masked_store, I.InterpreterBuilder.create_dot


def _load(self, ptrs, mask, other, cp, vol):
    m = mask.data.astype(bool) if mask is not None else np.ones(ptrs.data.shape, bool)
    if m.any():
        es = _get_es(ptrs)
        _cur["rec"]["loads"][_owner(ptrs.data[np.broadcast_to(m, ptrs.data.shape)])] += int(m.sum()) * es
    return _ol(self, ptrs, mask, other, cp, vol)


def _store(self, ptrs, value, mask, cp):
    m = mask.data.astype(bool)
    if m.any():
        es = _get_es(ptrs)
        _cur["rec"]["stores"][_owner(ptrs.data[np.broadcast_to(m, ptrs.data.shape)])] += int(m.sum()) * es
    return _os(self, ptrs, value, mask, cp)


def _get_es(ptrs):
    return ptrs.get_element_ty().primitive_bitwidth // 8


def _dot(self, a, b, d, ip, mx):
    _cur["rec"]["flops"] += 2.0 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
    return _od(self, a, b, d, ip, mx)


I.GridExecutor.__call__ = _call
I.InterpreterBuilder.create_masked_load = _load
I.InterpreterBuilder.create_masked_store = _store
I.InterpreterBuilder.create_dot = _dot

# GPU configs and a 132-SM device
_config.is_interpreter = lambda: False
_config.get_cpu_backend = lambda: "triton"
if hasattr(K, "is_interpreter"):
    K.is_interpreter = lambda: False
_config.num_sms = lambda device: 132
if hasattr(K, "num_sms"):
    K.num_sms = lambda device: 132
_config.DETERMINISTIC["flag"] = True


def run(M, d, ratio, backward):
    r = int(ratio * d * d / (2 * d))
    torch.manual_seed(0)
    dt = torch.bfloat16
    x = (torch.randn(M, d) / 8).to(dt).requires_grad_(backward)
    u = (torch.randn(d, r) / 8).to(dt).requires_grad_(backward)
    v = (torch.randn(r, d) / 8).to(dt).requires_grad_(backward)
    b = torch.zeros(d, dtype=dt).requires_grad_(backward)
    try:
        path = K.choose_path(M, d, d, r, dt)
    except TypeError:
        path = K.choose_path(M, d, d, r)
    LAUNCHES.clear()
    y = fastfactor.lowrank_linear(x, u, v, b)
    nf = len(LAUNCHES)
    if backward:
        y.backward(torch.ones_like(y))
    print(f"\n## M={M} d={d} r={r} ratio={ratio} path={path} ({'fwd+bwd' if backward else 'fwd'}); "
          f"useful fwd FLOPs {2*M*r*2*d/1e9:.3f} G")
    for i, l in enumerate(LAUNCHES):
        tag = "fwd" if i < nf else "bwd"
        ld = ", ".join(f"{n} {v/1e6:.2f}MB({v/max(1, l['sizes'].get(n, 1)):.2g}x)" for n, v in l["loads"].items())
        st = ", ".join(f"{n} {v/1e6:.2f}MB" for n, v in l["stores"].items())
        print(f"{tag} {l['kernel']:<22} programs {l['programs']:>5} ({l['programs']/132:.2f} of 132) "
              f"dot {l['flops']/1e9:.3f} GF | loads {ld} | stores {st}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--rows", choices=["decode", "wgrad", "small"], default="decode")
    a = p.parse_args()
    if a.rows == "decode":
        for d in (4096, 8192):
            run(16, d, 0.25, False)
    elif a.rows == "wgrad":
        run(16384, 768, 0.25, True)
    else:
        run(16, 1024, 0.25, False)
        run(16, 768, 0.25, True)
