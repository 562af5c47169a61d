"""Calibration statistics: what the data-aware initializations consume, collected with hooks.

* **activation Gram** ``G = Σ_batches XᵀX`` ``(in, in)`` of each target's input ``X (tokens, in)``
  (float64, with the token count): :func:`collect_activation_stats`;
* **Fisher information** ``F = Σ_batches (∂L/∂W)²`` ``(out, in)`` (elementwise, float64) of each
  target's ``(out, in)`` weight: :func:`collect_fisher`; the row importance of Hsu et al. (ICLR
  2022) is ``I_i = Σ_j F_ij``.

The factorizations built on them (Fisher-weighted SVD, activation-aware SVD, 2:4 scores) live in
:mod:`fastfactor.factorize.data_aware`; their old names here are deprecated aliases.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import nn

from .targets import is_conv1d


# ============================================================================================
# statistics
# ============================================================================================

@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, modules: Dict[str, nn.Module], batches: Iterable, forward: Callable
) -> Dict[str, Tuple[torch.Tensor, int]]:
    """``{name: (G (in, in) float64, tokens)}`` from the inputs each module sees while
    ``forward(model, batch)`` runs over ``batches``."""
    stats: Dict[str, list] = {}
    hooks = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            g, n = stats.get(name, (None, 0))
            gx = x.t() @ x
            stats[name] = (gx if g is None else g + gx, n + x.shape[0])

        return hook

    for name, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    was = model.training
    model.eval()
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    missing = [n for n in modules if n not in stats]
    if missing:
        raise RuntimeError(f"modules: {missing} saw no input during calibration (not used by forward?)")
    return {k: (v[0], v[1]) for k, v in stats.items()}


@torch.no_grad()
def collect_inputs(
    model: nn.Module, modules: Dict[str, nn.Module], batches: list, forward: Callable, max_rows: int,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """``{name: X (n, in) float32}``: a sample of the input rows each module sees while
    ``forward(model, batch)`` runs over ``batches`` (what the autoencoder method fits on).

    Rows are tokens. Padding tokens are left out where the batch has an ``attention_mask`` whose
    size matches the module's row count; each batch contributes at most
    ``ceil(max_rows / len(batches))`` rows, drawn by a generator seeded with ``seed`` and the batch
    index, so every module of a batch gets the *same* token positions (a module's outputs and the
    next module's inputs are samples of the same tokens) and a rerun gets the same sample."""
    quota = -(-int(max_rows) // max(1, len(batches)))
    rows: Dict[str, list] = {n: [] for n in modules}
    current = {}

    def make_hook(name):
        def hook(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            keep = current.get(x.shape[0])
            if keep is None:  # no mask of this size: every row is a candidate
                g = torch.Generator().manual_seed(current["seed"])
                keep = torch.randperm(x.shape[0], generator=g)[:quota].sort().values
                current[x.shape[0]] = keep
            rows[name].append(x[keep.to(x.device)].to(torch.float32).cpu())

        return hook

    hooks = [mod.register_forward_pre_hook(make_hook(name)) for name, mod in modules.items()]
    was = model.training
    model.eval()
    try:
        for i, b in enumerate(batches):
            current.clear()
            current["seed"] = int(seed) * 1000003 + i
            mask = b.get("attention_mask") if isinstance(b, dict) else None
            if isinstance(mask, torch.Tensor):
                idx = torch.nonzero(mask.reshape(-1) != 0).squeeze(1)
                g = torch.Generator().manual_seed(current["seed"])
                current[mask.numel()] = idx[torch.randperm(idx.numel(), generator=g)[:quota]].sort().values
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    missing = [n for n, r in rows.items() if not r]
    if missing:
        raise RuntimeError(f"modules: {missing} saw no input during calibration (not used by forward?)")
    return {n: torch.cat(r)[:max_rows] for n, r in rows.items()}


def collect_fisher(
    model: nn.Module, modules: Dict[str, nn.Module], batches: Iterable, loss_fn: Callable
) -> Dict[str, torch.Tensor]:
    """``{name: F (out, in) float64}``: accumulated squared gradients of ``loss_fn(model, batch)``
    with respect to each module's weight (``Conv1D`` weights transposed to ``(out, in)``).
    Other parameters' gradients are left untouched (they are saved and restored)."""
    saved = {id(p): p.grad for p in model.parameters()}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    fisher: Dict[str, torch.Tensor] = {}
    weights = {n: m.weight for n, m in modules.items()}
    was = model.training
    model.eval()  # no dropout: the statistic of the deterministic model
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for b in batches:
            for w in weights.values():
                w.grad = None
            loss = loss_fn(model, b)
            loss.backward()
            for n, w in weights.items():
                if w.grad is None:
                    raise RuntimeError(f"modules: {n!r} got no gradient during Fisher calibration")
                g = w.grad.detach().to(torch.float64)
                if is_conv1d(modules[n]):
                    g = g.t()
                fisher[n] = g * g if n not in fisher else fisher[n] + g * g
    finally:
        for p in model.parameters():
            p.grad = saved[id(p)]
            p.requires_grad_(flags[id(p)])
        model.train(was)
    return fisher


# ============================================================================================
# deprecated aliases (the factorizations moved to fastfactor.factorize.data_aware)
# ============================================================================================

_MOVED = ("fisher_row_weights", "fisher_svd_factors", "whitening_factor", "whitened_svd_factors", "sparse24_scores")


def __getattr__(name):
    if name in _MOVED:
        from ..factorize import data_aware

        warnings.warn(f"fastfactor.compress.calibration.{name} is deprecated; use "
                      f"fastfactor.factorize.data_aware.{name}", DeprecationWarning, stacklevel=2)
        return getattr(data_aware, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
