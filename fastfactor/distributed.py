"""Fine-tuning a compressed model on several processes: ``torchrun`` + DDP (or FSDP2).

The recipe
----------
1. ``info = init_from_env()`` in every process started by ``torchrun`` (or ``accelerate launch``):
   reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``, picks ``nccl`` on
   CUDA and ``gloo`` on CPU, pins the process to its GPU. Without those variables it returns a
   single-process ``DistInfo`` and initializes nothing, so the same script runs alone too.
2. Compress **before** wrapping: factors are ordinary ``nn.Parameter``s of the factorized modules,
   so DDP/FSDP see them like any weight. Either every rank factorizes identically (the SVD of the
   same weight on the same kind of device gives the same bits — ``tests/test_distributed.py``
   checks it across two processes) or, safer across heterogeneous machines and for randomized
   factorizations, call :func:`broadcast_module` after compression so every rank holds rank 0's
   factors (and buffers).
3. ``model = wrap_ddp(model)`` (or :func:`wrap_fsdp` for FSDP2's ``fully_shard``, torch >= 2.6).
4. Each rank reads its own slice of every global batch (:func:`iterate_sharded`, or
   :func:`shard_indices` for a ``DistributedSampler``-style epoch split). With a loss that is the
   mean over the local batch and equal local batch sizes, DDP's gradient averaging equals the
   gradient of the mean over the global batch, so ``k`` optimizer steps on ``W`` processes with
   local batch ``B`` match ``k`` steps of one process with batch ``W·B`` up to rounding of the
   all-reduce sum (tested).
5. Only the main process prints and writes: :func:`print0`, :func:`save0`, :func:`write_text0`
   (atomic and fsync-ed: :func:`fastfactor._io.atomic_write`), :func:`main_process_first` around
   downloads.

Everything here works (and is tested) on CPU with the ``gloo`` backend; the same code runs on GPUs
with ``nccl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from . import _io

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch builds without distributed support
    dist = None


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    the ``backend`` (``None`` when not distributed) and the ``device`` it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer environment variable, got {value!r}") from None


def is_distributed() -> bool:
    """Whether a default process group is initialized in this process."""
    return dist is not None and dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else _env_int("RANK", 0)


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else _env_int("WORLD_SIZE", 1)


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single-process run)."""
    return get_rank() == 0


def init_from_env(
    backend: Optional[str] = None,
    device: Optional[str] = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Initialize the default process group from ``torchrun``'s environment variables.

    Args:
        backend: ``'nccl'``, ``'gloo'`` (or another backend name); default ``nccl`` when the
            device is CUDA, else ``gloo``.
        device: ``'cuda'`` or ``'cpu'``; default CUDA when available. On CUDA the process is pinned
            to ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout.

    Returns the :class:`DistInfo`. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1`` and no
    ``MASTER_ADDR``) nothing is initialized and a single-process info comes back. Calling it again
    after the group exists returns the existing state.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch.cuda.is_available() is False")
    local_rank = get_local_rank()
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        if device == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, local_rank, None, dev)
    if dist is None or not dist.is_available():
        raise RuntimeError("init_from_env: this torch build has no torch.distributed support")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: expected an integer in [0, {world}) (WORLD_SIZE={world}), got {rank}")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(
                f"{var}: expected it in the environment (set by torchrun / accelerate launch) when "
                f"WORLD_SIZE={world}; launch with `torchrun --nproc_per_node N script.py`"
            )
    if backend is None:
        backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(dev)
    kwargs = dict(backend=backend, rank=rank, world_size=world,
                  timeout=datetime.timedelta(seconds=timeout_s))
    if device == "cuda" and backend == "nccl":
        kwargs["device_id"] = dev  # eager NCCL init bound to this GPU (torch >= 2.3)
    dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local_rank, backend, dev)


def cleanup() -> None:
    """Destroy the default process group (no-op when there is none)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# main-process-only output
# --------------------------------------------------------------------------------------------

def print0(*args, **kwargs) -> None:
    """``print`` on the main process only (flushes, so that logs of several ranks interleave well)."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Let rank 0 run the block first (e.g. a download or a cache build), then the others."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def save0(obj, path: str, barrier_after: bool = True) -> bool:
    """``torch.save(obj, path)`` on the main process only, through :func:`fastfactor._io.atomic_write`
    (temporary file, fsync, rename, fsync of the directory); the other ranks wait at a barrier (unless ``barrier_after=False``) so the file exists
    for everybody afterwards. Returns whether this process wrote."""
    wrote = False
    if is_main_process():
        _io.atomic_write(path, lambda f: torch.save(obj, f))
        wrote = True
    if barrier_after:
        barrier()
    return wrote


def write_text0(path: str, text: str, barrier_after: bool = True) -> bool:
    """Write ``text`` (UTF-8) to ``path`` on the main process only (atomic: :func:`fastfactor._io.atomic_write`);
    see :func:`save0`."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    wrote = False
    if is_main_process():
        _io.atomic_write_text(path, text)
        wrote = True
    if barrier_after:
        barrier()
    return wrote


# --------------------------------------------------------------------------------------------
# parameters across ranks
# --------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modifies modules in place: returned as is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0, buffers: bool = True) -> nn.Module:
    """Overwrite every parameter (and buffer) of ``module`` with rank ``src``'s values, in place.

    Call it after compression and before wrapping, when ranks may have factorized differently
    (randomized methods, different hardware). Shapes must already agree on every rank (the same
    compression plan); a mismatch raises instead of hanging.
    """
    if not is_distributed():
        return module
    tensors = [p for _, p in module.named_parameters()]
    if buffers:
        tensors += [b for _, b in module.named_buffers()]
    _check_same_layout(module, tensors)
    for t in tensors:
        dist.broadcast(t.data, src=src)
    return module


def _check_same_layout(module: nn.Module, tensors: Sequence[torch.Tensor]) -> None:
    """All ranks hold the same number of tensors with the same shapes (else a clear error)."""
    sig = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sig)
    for r, other in enumerate(gathered):
        if other != sig:
            names = [n for n, _ in module.named_parameters()]
            diff = next((i for i, (a, b) in enumerate(zip(sig, other)) if a != b), min(len(sig), len(other)))
            where = names[diff] if diff < len(names) else f"tensor #{diff}"
            raise ValueError(
                f"module: parameters differ between rank {dist.get_rank()} and rank {r} at {where} "
                f"({sig[diff] if diff < len(sig) else 'missing'} vs "
                f"{other[diff] if diff < len(other) else 'missing'}); compress with the same plan on every rank"
            )


@torch.no_grad()
def max_param_difference(module: nn.Module) -> Dict[str, float]:
    """For every parameter, the largest ``|p_rank - p_rank0|`` over all ranks (``{}`` single-process).

    0.0 everywhere means the ranks hold bitwise identical parameters. Every rank gets the result.
    FSDP2 (DTensor) parameters are gathered to full tensors first.
    """
    if not is_distributed():
        return {}
    out = {}
    for name, p in unwrap(module).named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # DTensor (FSDP2): compare the full parameter
            t = t.full_tensor()
        t = t.to(torch.float64).reshape(-1)
        ref = t.clone()
        dist.broadcast(ref, src=0)
        diff = (t - ref).abs().nan_to_num(nan=float("inf"))
        d = diff.max() if diff.numel() else torch.zeros((), dtype=torch.float64, device=t.device)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        out[name] = float(d)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a new tensor; the input itself single-process)."""
    if not is_distributed():
        return value
    t = value.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on *every* rank (one small all-reduce), so that all ranks stop
    together when one of them sees a NaN/Inf loss instead of some waiting forever."""
    ok = bool(torch.isfinite(value.detach()).all())
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=value.device if value.is_cuda else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# --------------------------------------------------------------------------------------------
# wrapping
# --------------------------------------------------------------------------------------------

def wrap_ddp(model: nn.Module, device: Optional[torch.device] = None, broadcast: bool = True, **ddp_kwargs):
    """``DistributedDataParallel(model)`` (the model itself when not distributed).

    ``device``: the process's device (default: the model's). ``broadcast=True`` keeps DDP's own
    broadcast of rank 0's parameters and buffers at construction (``broadcast_buffers`` etc. go
    through ``ddp_kwargs``). Compress before wrapping: parameters created later are not synced.
    """
    if not is_distributed():
        return model
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index if device.index is not None else get_local_rank()])
    if not broadcast:
        ddp_kwargs.setdefault("init_sync", False)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def has_fsdp2() -> bool:
    """Whether ``torch.distributed.fsdp.fully_shard`` (FSDP2, public since torch 2.6) is importable."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap_fsdp(
    model: nn.Module,
    shard_classes: Optional[Iterable[type]] = None,
    device_type: Optional[str] = None,
    **fsdp_kwargs,
) -> nn.Module:
    """Shard ``model`` with FSDP2's ``fully_shard`` (in place; the model comes back).

    ``shard_classes``: module classes sharded as their own units (default: :func:`shard_units`,
    i.e. a Hugging Face model's ``_no_split_modules`` blocks, else every ``FactorizedLinear`` and
    ``nn.Linear``); the root is sharded last. ``fsdp_kwargs`` go to ``fully_shard``
    (``mp_policy``, ``reshard_after_forward``...). The mesh is one-dimensional over all ranks on
    ``device_type`` (default: CUDA when available, else CPU with gloo).
    """
    if not has_fsdp2():
        raise RuntimeError("wrap_fsdp: torch.distributed.fsdp.fully_shard needs torch >= 2.6")
    if not is_distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = fsdp_kwargs.pop("mesh", None) or init_device_mesh(device_type, (dist.get_world_size(),))
    units = shard_units(model, shard_classes)
    for m in units:
        fully_shard(m, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


def shard_units(model: nn.Module, shard_classes: Optional[Iterable[type]] = None) -> List[nn.Module]:
    """The sub-modules FSDP2 shards as their own units, in post-order (the root excluded).

    Default: the classes a Hugging Face model lists in ``_no_split_modules`` (its transformer
    blocks, the unit ``accelerate`` and ``device_map`` keep whole) when it has any, else every
    ``FactorizedLinear`` and ``nn.Linear``. A unit nested in another unit is kept (FSDP2 shards
    inner units first)."""
    from .layers.base import FactorizedLinear

    if shard_classes is not None:
        match = lambda m: isinstance(m, tuple(shard_classes))  # noqa: E731
    else:
        names = set(getattr(model, "_no_split_modules", None) or ())
        if names and any(type(m).__name__ in names for m in model.modules()):
            match = lambda m: type(m).__name__ in names  # noqa: E731
        else:
            match = lambda m: isinstance(m, (FactorizedLinear, nn.Linear))  # noqa: E731
    found = [m for m in model.modules() if m is not model and match(m)]
    return found[::-1]


def fsdp_copy(model: nn.Module, device=None, shard_classes: Optional[Iterable[type]] = None, **fsdp_kwargs) -> nn.Module:
    """A copy of ``model`` sharded with FSDP2 ``fully_shard`` for training; ``model`` is untouched.

    Collective: every rank calls it with the same (identical) model. The copy is built on the
    ``meta`` device (no second full set of weights is ever allocated), sharded (units from
    :func:`shard_units`, then the root), materialized on ``device`` and filled with this rank's
    shard of ``model``'s tensors (``set_model_state_dict`` from the full state dict); buffers, which
    FSDP does not shard, are copied. Tied parameters stay tied. Train the copy, then
    :func:`fsdp_copy_back` writes the trained values into ``model``.

    The driver fine-tunes such a copy because it keeps replacing modules of ``model`` between stages,
    which a model sharded in place (its classes and parameters changed by ``fully_shard``) no longer
    allows.
    """
    import copy

    if not has_fsdp2():
        raise RuntimeError("fsdp_copy: torch.distributed.fsdp.fully_shard needs torch >= 2.6")
    if not is_distributed():
        raise RuntimeError("fsdp_copy: needs an initialized process group (run under torchrun)")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    shadow = copy.deepcopy(model, memo)
    mesh = fsdp_kwargs.pop("mesh", None) or init_device_mesh(device.type, (dist.get_world_size(),))
    for m in shard_units(shadow, shard_classes):
        fully_shard(m, mesh=mesh, **fsdp_kwargs)
    fully_shard(shadow, mesh=mesh, **fsdp_kwargs)
    shadow.to_empty(device=device)
    with torch.no_grad():
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for name, _ in list(shadow.named_buffers(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            shadow.get_submodule(owner)._buffers[leaf] = buffers[name].detach().to(device).clone()
    set_model_state_dict(shadow, model.state_dict(), options=StateDictOptions(full_state_dict=True))
    return shadow


def fsdp_copy_back(sharded: nn.Module, model: nn.Module) -> nn.Module:
    """Write the full (all-gathered) parameters and buffers of an :func:`fsdp_copy` into ``model``
    in place. Collective: every rank calls it, and every rank's ``model`` gets the same values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        own = model.state_dict()
        missing = sorted(set(own) - set(full))
        if missing:
            raise RuntimeError(f"fsdp_copy_back: the sharded copy lacks {missing[:6]}; it is not a copy of this model")
        for k, t in own.items():
            t.copy_(full[k])
    return model


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer``'s state keyed by parameter name (not position), every tensor whole: the same
    for a plain model, a DDP model's ``module`` and an FSDP2-sharded one (gathered; collective
    then). What a checkpoint stores, and what :func:`load_full_optimizer_state` takes back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_optimizer_state` into ``optimizer`` (each rank takes its shard under FSDP2).
    Parameters without state (those that never had a gradient, e.g. an unused pooler) stay without,
    as in the optimizer that was saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


# --------------------------------------------------------------------------------------------
# data split
# --------------------------------------------------------------------------------------------

def shard_indices(
    n: int,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> torch.Tensor:
    """This rank's sample indices for one epoch, the way ``DistributedSampler`` splits them.

    The epoch's order (a permutation seeded with ``seed + epoch`` when ``shuffle``) is padded by
    repeating its head to a multiple of ``world_size`` (or truncated with ``drop_last``), and rank
    ``r`` takes positions ``r, r + W, r + 2W, ...``. Every rank gets the same count; together they
    cover every index (padding aside).
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int (dataset size), got {n!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        order = torch.arange(n)
    if drop_last:
        order = order[: (n // world_size) * world_size]
    elif n % world_size:
        pad = world_size - n % world_size
        if n == 0:
            raise ValueError(f"n: cannot split an empty dataset over {world_size} ranks without drop_last")
        reps = -(-pad // n)
        order = torch.cat([order, order.repeat(reps)[:pad]])
    return order[rank::world_size]


def local_slice(global_batch_size: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> slice:
    """The rows of a global batch of ``global_batch_size`` that this rank takes (contiguous,
    ``torch.tensor_split`` sizes: they differ by at most one)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(global_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def iterate_sharded(
    batch: Dict[str, torch.Tensor],
    global_batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epochs_forever: bool = False,
    drop_last: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    start: int = 0,
) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's part of every global mini-batch of a split (a dict of equal-length tensors).

    All ranks draw the same permutation per epoch (seeded with ``seed``, as
    ``fastfactor.train.data.iterate`` does), cut it into global batches of ``global_batch_size``
    and take their :func:`local_slice`, so the union over ranks of step ``i`` is exactly the
    single-process batch ``i`` of ``iterate(batch, global_batch_size, shuffle, seed)``.
    ``drop_last`` skips a last global batch smaller than ``global_batch_size`` (whose uneven
    split would weight samples unequally under DDP's gradient average). Batches go through
    ``fastfactor.train.data.select`` when that module is importable (trims padding), else plain
    indexing. ``start`` skips that many (global) batches first without building them: the data
    position of a resumed run.
    """
    world_size = get_world_size() if world_size is None else world_size
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start: expected an int >= 0 (batches to skip), got {start!r}")
    rank = get_rank() if rank is None else rank
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size: expected an int >= 1, got {global_batch_size!r}")
    if global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size: expected a multiple of the world size {world_size} (equal local "
            f"batches), got {global_batch_size}"
        )
    key = "input_ids" if "input_ids" in batch else next(iter(batch))
    n = int(batch[key].shape[0])
    if n == 0:
        raise ValueError("batch: the split is empty")
    try:
        from .train.data import select
    except ImportError:  # pragma: no cover
        select = lambda b, idx: {k: v[idx] for k, v in b.items()}  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    part = local_slice(global_batch_size, rank, world_size)
    while True:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for i in range(0, n, global_batch_size):
            idx = order[i : i + global_batch_size]
            if drop_last and idx.numel() < global_batch_size:
                break
            if start:
                start -= 1
                continue
            if idx.numel() < global_batch_size:
                part_i = local_slice(idx.numel(), rank, world_size)
            else:
                part_i = part
            yield select(batch, idx[part_i])
        if not epochs_forever:
            return


__all__ = [
    "DistInfo", "init_from_env", "cleanup", "barrier", "is_distributed", "get_rank", "get_world_size",
    "get_local_rank", "is_main_process", "print0", "main_process_first", "save0", "write_text0",
    "broadcast_module", "max_param_difference", "all_reduce_mean", "all_finite", "unwrap", "wrap_ddp", "wrap_fsdp",
    "has_fsdp2", "shard_units", "fsdp_copy", "fsdp_copy_back", "full_optimizer_state", "load_full_optimizer_state", "shard_indices", "local_slice", "iterate_sharded",
]
