"""Exact per-launch accounting under the Triton interpreter.

For one recorded :class:`~fastfactor.sol.record.Launch` and one config, :func:`count_launch` runs
programs of the kernel through the interpreter with the load, store and dot builders wrapped, and
counts, per tensor argument:

* bytes requested by loads and by stores (masked-off elements excluded);
* 32-byte sectors touched per access (union over the program's tile: the best any warp split of
  the tile can do), hence sector efficiency = bytes / (32 · sectors);
* the widest contiguous run of each access in bytes (``access_bytes``: 2 means scalar 2-byte
  accesses; 16 or more lets the compiler issue 16-byte vectors);
* ``tl.dot`` FLOPs issued (``2·m·n·k`` of the operand tiles, padding included).

Big launches cannot be interpreted whole. Programs fall into classes that move exactly the same
amount: along each grid axis the first, the last and every one in between (tiles at the edges are
masked, the first program of an axis may carry extra work such as a fused row sum); kernels whose
axis 0 flattens a 2-D tile grid declare how (:data:`TILE_MAPS`), and their classes are taken on the
2-D tile indices. One program per class is run and its counts are multiplied by the class size
(``mode='scaled'``); ``mode='full'`` runs every program (tests check both agree on small shapes).
Unique bytes are exact in ``full`` mode; in ``scaled`` mode they are ``min(requested, bytes of the
tensor view)``, which the same tests check on small shapes.

Needs ``TRITON_INTERPRET=1`` before the kernel modules are imported (the ``fastfactor sol``
command re-executes itself with it).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
from typing import Callable, Optional

import numpy as np
import torch

from ..kernels import _config


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------------------------
# program classes
# --------------------------------------------------------------------------------------------

def _grouped(m_arg: str, n_arg: str) -> Callable:
    """Axis 0 of a GEMM with grouped ordering (``GROUP_M`` row blocks per group)."""

    def tiles(meta):
        nm = _cdiv(meta[m_arg], meta["BLOCK_M"])
        nn = _cdiv(meta[n_arg], meta["BLOCK_N"])
        gm = meta["GROUP_M"]

        def of(pid):
            group = gm * nn
            first = (pid // group) * gm
            size = min(nm - first, gm)
            return first + (pid % group) % size, (pid % group) // size

        return (nm, nn), of

    return tiles


def _row_major(m_arg: str, n_arg: str) -> Callable:
    """Axis 0 flattening ``(pid_m, pid_n)`` row-major: ``pid_m = pid // nn``."""

    def tiles(meta):
        nm = _cdiv(meta[m_arg], meta["BLOCK_M"])
        nn = _cdiv(meta[n_arg], meta["BLOCK_N"])
        return (nm, nn), lambda pid: (pid // nn, pid % nn)

    return tiles


#: kernels whose grid axis 0 is a flattened 2-D tile grid: ``meta -> ((nm, nn), pid -> (pm, pn))``
TILE_MAPS = {
    "lowrank.gemm": _grouped("M", "N"),
    "monarch.bgemm": _row_major("I", "J"),
    "monarch.bgemm_fp16": _row_major("I", "J"),
}


def _tiles_by_split(n_arg: str, split_arg: str, block: str) -> Callable:
    """Axis 0 flattening ``(row tile, K split)`` split-minor: ``tile = pid // SPLIT_K`` (the 2:4
    decode kernel; the last split of each tile is its reducer under the interpreter)."""

    def tiles(meta):
        nn = _cdiv(meta[n_arg], meta[block])
        ns = int(meta[split_arg])
        return (nn, ns), lambda pid: (pid // ns, pid % ns)

    return tiles


TILE_MAPS["sparse24.decode"] = _tiles_by_split("N", "SPLIT_K", "BLOCK_N")
TILE_MAPS["sparse24.decode_mma"] = _tiles_by_split("N", "SPLIT_K", "BLOCK_N")
TILE_MAPS["sparse24.dx_decode"] = _tiles_by_split("K", "SPLIT_N", "BLOCK_K")
TILE_MAPS["sparse24.ds_rank_split"] = _tiles_by_split("N", "SPLITS", "BLOCK_N")
TILE_MAPS["sparse24.ds_bwd_dense"] = _tiles_by_split("R", "SPLITS", "BLOCK_R")


#: kernels whose 1-D grid is split into consecutive *roles* (different work per role): ``meta ->
#: [programs of role 0, of role 1, ...]``; classes are then the first, interior and last program
#: of each role (``lowrank.decode``: producers, reducers, consumers)
ROLE_MAPS = {
    "lowrank.decode": lambda meta: [int(meta["N0"]), int(meta["N1"]), int(meta["N2"])],
    "lowrank.decode_bwd": lambda meta: [int(meta["N0"]), int(meta["N1"]), int(meta["N2"])],
    # split-major producers (every rank chunk's split s, then s + 1; the last split reduces), consumers
    "sparse24.ds_roles": lambda meta: [int(meta["N0"])] * int(meta.get("KS", 1)) + [int(meta["N1"])],
}


def _wgrad_pair_roles(meta) -> list:
    """The one-launch Monarch weight gradients (``monarch.wgrad_pair``): axis 0 holds dw1's feature
    tiles then dw2's; on axis 1 each side has its splits with rows (the last of them sums a split
    side's partials in the interpreter's id order), then idle splits (a side split less often than
    the other)."""
    bn, nb = int(meta["BLOCK_N"]), int(meta["NB"])
    roles = []
    for side in ("A", "B"):
        sb = int(meta[f"SB_{side}"])
        tiles = nb * _cdiv(sb, bn) if meta[f"BLOCKWISE_{side}"] else _cdiv(nb * sb, bn)
        roles.append((tiles, [int(meta[f"SPLITS_{side}"])]))
    return roles


#: kernels whose 2-D grid holds different work per region: ``meta -> [(programs of an axis-0 role,
#: [sizes of its consecutive axis-1 roles]), ...]`` (axis-1 programs past the listed roles form one
#: more role); classes are the first, interior and last program of each role on each axis
ROLE_MAPS_2D = {
    "monarch.wgrad_pair": _wgrad_pair_roles,
    "monarch.wgrad_pair_fp16": _wgrad_pair_roles,
}


def _edge_class(i: int, n: int) -> int:
    return 0 if i == 0 else (2 if i == n - 1 else 1)


def _axis_classes(n: int) -> dict:
    """``representative -> count`` of the first / interior / last indices of an axis of size n."""
    out = {0: 1}
    if n > 2:
        out[1] = n - 2
    if n > 1:
        out[n - 1] = 1
    return out


def program_classes(kernel: str, grid: tuple, meta: dict) -> list:
    """``[(pid (x, y, z), count)]`` covering every program of the grid once."""
    rm = ROLE_MAPS.get(kernel)
    if rm is not None:
        sizes = rm(meta)
        if sum(sizes) != grid[0] or grid[1] * grid[2] != 1:
            raise ValueError(f"{kernel}: grid {grid}, roles say {sizes}")
        out, start = [], 0
        for n in sizes:
            out += [((start + i, 0, 0), c) for i, c in _axis_classes(n).items()] if n else []
            start += n
        return out
    rm2 = ROLE_MAPS_2D.get(kernel)
    if rm2 is not None:
        roles = rm2(meta)
        if sum(n for n, _ in roles) != grid[0] or grid[2] != 1:
            raise ValueError(f"{kernel}: grid {grid}, roles say {roles}")
        out, x0 = [], 0
        for n, ys in roles:
            ys = [m for m in ys + [grid[1] - sum(ys)] if m > 0]
            y0 = 0
            for m in ys:
                for x, cx in _axis_classes(n).items():
                    for y, cy in _axis_classes(m).items():
                        out.append(((x0 + x, y0 + y, 0), cx * cy))
                y0 += m
            x0 += n
        return out
    axes = []
    tm = TILE_MAPS.get(kernel)
    for a, n in enumerate(grid):
        if a == 0 and tm is not None:
            (nm, nn), of = tm(meta)
            if nm * nn != n:
                raise ValueError(f"{kernel}: grid axis 0 is {n}, tile map says {nm}x{nn}")
            reps: dict = {}
            counts = collections.Counter()
            for pid in range(n):
                pm, pn = of(pid)
                cls = (_edge_class(pm, nm), _edge_class(pn, nn))
                reps.setdefault(cls, pid)
                counts[cls] += 1
            axes.append({reps[c]: counts[c] for c in reps})
        else:
            axes.append(_axis_classes(n))
    out = []
    for x, cx in axes[0].items():
        for y, cy in axes[1].items():
            for z, cz in axes[2].items():
                out.append(((x, y, z), cx * cy * cz))
    return out


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TensorCount:
    load_bytes: float = 0.0
    store_bytes: float = 0.0
    load_sectors: float = 0.0
    store_sectors: float = 0.0
    loads: float = 0.0          # load instructions (tile accesses) executed
    stores: float = 0.0
    load_access_bytes: int = 0  # narrowest contiguous run among this tensor's loads (bytes)
    store_access_bytes: int = 0
    unique_bytes: Optional[float] = None
    size_bytes: int = 0         # bytes of the tensor view passed

    def add(self, other: "TensorCount", k: float) -> None:
        for f in ("load_bytes", "store_bytes", "load_sectors", "store_sectors", "loads", "stores"):
            setattr(self, f, getattr(self, f) + k * getattr(other, f))
        for f in ("load_access_bytes", "store_access_bytes"):
            a, b = getattr(self, f), getattr(other, f)
            setattr(self, f, min(a, b) if a and b else (a or b))

    @property
    def sector_efficiency(self) -> Optional[float]:
        sec = self.load_sectors + self.store_sectors
        return (self.load_bytes + self.store_bytes) / (32.0 * sec) if sec else None

    @property
    def reread(self) -> Optional[float]:
        """Bytes loaded over the size of the tensor view."""
        return self.load_bytes / self.size_bytes if self.size_bytes else None


@dataclasses.dataclass
class LaunchCount:
    kernel: str
    config: dict
    grid: tuple
    programs: int
    classes: int
    dot_flops: float
    tensors: dict
    mode: str
    reduction: int = 0   # longest reduction of one program's accumulator (elements)
    dot_m: int = 0       # smallest M tile of its tl.dot calls

    @property
    def load_bytes(self) -> float:
        return sum(t.load_bytes for t in self.tensors.values())

    @property
    def store_bytes(self) -> float:
        return sum(t.store_bytes for t in self.tensors.values())

    def as_dict(self) -> dict:
        return dict(
            kernel=self.kernel, config=self.config, grid=list(self.grid), programs=self.programs,
            program_classes=self.classes, dot_flops=self.dot_flops, mode=self.mode,
            reduction=self.reduction, dot_m=self.dot_m,
            tensors={k: dict(dataclasses.asdict(v), sector_efficiency=v.sector_efficiency, reread=v.reread)
                     for k, v in self.tensors.items()},
        )


def _contig_bytes(addrs: np.ndarray, elem: int) -> int:
    """Widest run of consecutive elements along one axis of the access tile, in bytes."""
    if addrs.ndim == 0 or addrs.size <= 1:
        return elem
    best = elem
    for ax in range(addrs.ndim):
        if addrs.shape[ax] < 2:
            continue
        d = np.diff(addrs.astype(np.int64), axis=ax)
        if np.all(d == elem):
            best = max(best, addrs.shape[ax] * elem)
    return best


class _Counter:
    def __init__(self, tensors: dict, keep_addresses: bool):
        # address ranges of the tensor arguments
        self.ranges = []
        for name, t in tensors.items():
            lo = t.data_ptr()
            span = (sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) + 1) * t.element_size() if t.numel() else 0
            self.ranges.append((lo, lo + span, name))
        self.ranges.sort()
        self.starts = np.array([r[0] for r in self.ranges], dtype=np.uint64) if self.ranges else np.zeros(0, np.uint64)
        self.counts = {name: TensorCount() for name in tensors}
        self.flops = 0.0
        self.keep = keep_addresses
        self.addresses = collections.defaultdict(list)
        self.unknown = 0
        self.weights = [1.0]                 # loop sampling: how many iterations the current one stands for
        self.red = collections.Counter()   # (m, n) of a dot -> summed k: the program's reduction
        self.dot_m = 0                      # smallest M of the program's dots (wgmma needs >= 64)

    def owner(self, addr: int) -> Optional[str]:
        i = int(np.searchsorted(self.starts, np.uint64(addr), side="right")) - 1
        if i >= 0 and self.ranges[i][0] <= addr < max(self.ranges[i][1], self.ranges[i][0] + 1):
            return self.ranges[i][2]
        return None

    def access(self, kind: str, ptrs, mask) -> None:
        addrs = np.asarray(ptrs.data)
        elem = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape) if mask is not None else np.ones(addrs.shape, bool)
        act = addrs[m]
        if act.size == 0:
            return
        name = self.owner(int(act[0]))
        if name is None:
            self.unknown += act.size * elem
            return
        c = self.counts[name]
        w = self.weights[-1]
        nbytes = w * act.size * elem
        sectors = w * np.unique(act // np.uint64(32)).size
        width = _contig_bytes(addrs, elem)
        if kind == "load":
            c.load_bytes += nbytes
            c.load_sectors += sectors
            c.loads += w
            c.load_access_bytes = min(c.load_access_bytes, width) if c.load_access_bytes else width
        else:
            c.store_bytes += nbytes
            c.store_sectors += sectors
            c.stores += w
            c.store_access_bytes = min(c.store_access_bytes, width) if c.store_access_bytes else width
        if self.keep:
            self.addresses[name].append(np.unique(act // np.uint64(elem)) * np.uint64(elem))

    def dot(self, a, b) -> None:
        sa, sb = a.data.shape, b.data.shape
        m, k = sa[-2], sa[-1]
        n = sb[-1]
        batch = math.prod(sa[:-2]) if len(sa) > 2 else 1
        w = self.weights[-1]
        self.flops += w * 2.0 * batch * m * n * k
        self.red[(m, n)] += w * k
        self.dot_m = min(self.dot_m, m) if self.dot_m else m


def _sampling_range(counter: "_Counter", threshold: int = 6):
    """A ``range`` for kernel loops that runs the first two, one interior and the last iteration
    of a long loop, the interior one standing for all the others (counts are multiplied by the
    weight). Exact when interior iterations move the same amounts (masks only at the ends), which
    the tests check against full runs."""
    import operator

    def sampled(*args):
        r = range(*[operator.index(a) for a in args])
        n = len(r)
        plan = [(v, 1.0) for v in r] if n <= threshold else \
            [(r[0], 1.0), (r[1], 1.0), (r[n // 2], float(n - 3)), (r[n - 1], 1.0)]
        for v, w in plan:
            counter.weights.append(counter.weights[-1] * w)
            try:
                yield v
            finally:
                counter.weights.pop()

    return sampled


def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(fn, InterpretedFunction):
        return fn
    raise RuntimeError(
        "fastfactor sol: counting needs the kernels interpreted: set TRITON_INTERPRET=1 before "
        "fastfactor is imported (the `fastfactor sol` command does this itself)"
    )


def run_programs(launch, cfg: dict, pids, counter: _Counter, grid, sample_loops: bool = False) -> None:
    """Run the given programs of ``launch`` with config ``cfg`` under the interpreter
    (``sample_loops``: long loops sampled, see :func:`_sampling_range`)."""
    from triton.runtime import interpreter as I

    fn = _interpreted(launch.fn)
    rewritten = fn.rewrite()
    ex = I.GridExecutor(rewritten, fn.arg_names, grid)
    kw = {**launch.args, **_config.interpreter_constexprs(launch.constexprs)}
    kw.update({k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
    b = I.interpreter_builder
    orig = (b.create_masked_load, b.create_masked_store, b.create_dot)

    # the cache / eviction / volatile arguments after these differ between Triton versions (3.6:
    # cache modifier, eviction policy, volatile; 3.9: cache policy, volatile): passed on as given
    def load(ptrs, mask, other, *rest):
        counter.access("load", ptrs, mask)
        return orig[0](ptrs, mask, other, *rest)

    def store(ptrs, value, mask, *rest):
        counter.access("store", ptrs, mask)
        return orig[1](ptrs, value, mask, *rest)

    def dot(a, bb, d, prec, imp):
        # counted, not computed: values never steer addresses in these kernels, and the
        # interpreter's bf16 matmul (integer arrays, no BLAS) would dominate the run time
        counter.dot(a, bb)
        shape = tuple(a.data.shape[:-1]) + (bb.data.shape[-1],)
        return I.TensorHandle(np.broadcast_to(d.data, shape).copy(), d.dtype.scalar)

    scope = I._patch_lang(rewritten)
    b.create_masked_load, b.create_masked_store, b.create_dot = load, store, dot
    glb = rewritten.__globals__
    had_range, old_range = "range" in glb, glb.get("range")
    if sample_loops:
        glb["range"] = _sampling_range(counter)
    try:
        args = inspect.getcallargs(rewritten, **kw)
        args = {n: v if n in ex.constexprs else I._implicit_cvt(v) for n, v in args.items()}
        b.set_grid_dim(*grid)
        with np.errstate(all="ignore"):
            for pid in pids:
                b.set_grid_idx(*pid)
                rewritten(**args)
    finally:
        del b.create_masked_load, b.create_masked_store, b.create_dot
        if sample_loops:
            if had_range:
                glb["range"] = old_range
            else:
                glb.pop("range", None)
        scope.restore()


def count_launch(launch, cfg: dict, mode: str = "scaled") -> LaunchCount:
    """Counts of one launch with one config (see the module docstring). ``mode``: ``scaled``
    (one program per class, multiplied) or ``full`` (every program; unique bytes exact)."""
    if mode not in ("scaled", "full"):
        raise ValueError(f"mode: expected 'scaled' or 'full', got {mode!r}")
    grid = launch.grid_for(cfg)
    tensors = tensor_groups(launch.args)
    meta = {**launch.args, **launch.constexprs, **cfg}
    total = {name: TensorCount() for name in tensors}
    flops = 0.0
    if mode == "full":
        pids = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
        c = _Counter(tensors, keep_addresses=True)
        run_programs(launch, cfg, pids, c, grid)
        for name, tc in c.counts.items():
            total[name].add(tc, 1)
            if c.addresses[name]:
                total[name].unique_bytes = float(np.unique(np.concatenate(c.addresses[name])).size
                                                 * tensors[name].element_size())
            else:
                total[name].unique_bytes = 0.0
        flops = c.flops
        red = 0  # the per-program reduction is a scaled-mode figure (one counter spans every program here)
        dot_m = c.dot_m
        nclass = len(pids)
    else:
        classes = program_classes(launch.kernel, grid, meta)
        red, dot_m = 0, 0
        for pid, k in classes:
            c = _Counter(tensors, keep_addresses=False)
            run_programs(launch, cfg, [pid], c, grid, sample_loops=True)
            for name, tc in c.counts.items():
                total[name].add(tc, k)
            flops += k * c.flops
            red = max(red, max(c.red.values(), default=0))
            dot_m = min(dot_m, c.dot_m) if dot_m and c.dot_m else (dot_m or c.dot_m)
        for name, tc in total.items():
            tc.unique_bytes = float(min(tc.load_bytes + tc.store_bytes, _view_bytes(tensors[name])))
        nclass = len(classes)
    for name, tc in total.items():
        tc.size_bytes = _view_bytes(tensors[name])
    # aliased arguments (a placeholder passed for an unused pointer) keep only their first name
    return LaunchCount(kernel=launch.kernel, config=dict(cfg), grid=grid, programs=math.prod(grid),
                       classes=nclass, dot_flops=flops, tensors=total, mode=mode,
                       reduction=int(red), dot_m=int(dot_m))


def tensor_groups(args: dict) -> dict:
    """Tensor arguments by name; arguments passing the same memory (a placeholder for an unused
    pointer) are one entry named ``a/b``."""
    groups: dict = {}
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(key, []).append((name, t))
    return {"/".join(n for n, _ in items): items[0][1] for items in groups.values()}


def _view_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
