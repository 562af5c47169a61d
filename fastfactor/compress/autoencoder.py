"""The autoencoder method's block scope: fit the bottlenecks of a whole transformer block against
the block's output (Banaei et al., EACL 2023, "modules compressed together" across layers).

``scope="module"`` needs nothing here: each target is fitted to its own outputs by the family's
init (:func:`fastfactor.factorize.autoencoder.fit_bottleneck`, from the ``"inputs"`` statistic).
``scope="block"`` starts from exactly that and then, for each transformer block of the stage in
model order:

1. **targets** — before the stage's swap, one pass over the calibration batches records every
   block's output ``Y_b`` on the uncompressed (for this stage) model: :func:`block_outputs`;
2. **inputs** — after the swap (and after the earlier blocks' refinement), one pass records the
   block's positional and keyword inputs ``(args, kwargs)`` on the *current* model, so the block
   is fitted to the inputs it will really see (the errors of the compressed blocks before it
   included) and learns to compensate for them: :func:`block_inputs`;
3. **fit** — every parameter of the factorized modules inside the block (``U``, ``V``, the
   nonlinear form's ``c``, the biases; a joint module's shared factors alike) is trained with Adam
   (relative learning rate ``ae_lr``) on ``mean‖block(args, kwargs) − Y_b‖²``, one held-in batch
   per step in a fixed cyclic order (a step costs one block forward and backward); the held-out
   batches (``max(1, round(calib_batches / 4))``, the last ones) are measured
   every ``EVAL_EVERY`` steps; the best held-out state, the module-scope start included, is kept
   and training stops after ``PATIENCE`` evaluations without improvement or ``ae_steps`` steps.
   Later modules of the block thus compensate for the earlier ones' errors. Dropout is off.

Everything is deterministic for a given config and data (fixed batches, no sampling), so a run
killed in a stage and resumed recomputes that stage bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .. import distributed as _dist
from ..factorize.autoencoder import relative_groups
from ..layers.base import FactorizedLinear

EVAL_EVERY = 5
PATIENCE = 4
#: keyword inputs of a block that hold a key/value cache: dropped when the block is replayed
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


def _is_cache(obj) -> bool:
    """A key/value cache object (transformers' ``Cache`` classes): replaying a block must not grow it."""
    return type(obj).__name__.endswith("Cache")


class _Stop(Exception):
    """Raised by the input hook to end a forward pass once the block's inputs are recorded."""


def _hidden(out) -> torch.Tensor:
    """The hidden states of a block's output (HF blocks return a tuple whose first item they are)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"block output: expected a tensor or a tuple starting with one, got {type(out).__name__}")
    return out


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def block_outputs(model: nn.Module, blocks: Dict[str, nn.Module], batches: list, forward) -> Dict[str, list]:
    """``{block name: [hidden output per batch]}`` of ``forward(model, batch)`` (eval mode)."""
    outs: Dict[str, list] = {n: [] for n in blocks}
    hooks = [blk.register_forward_hook(lambda m, a, o, n=n: outs[n].append(_hidden(o).detach().clone()))
             for n, blk in blocks.items()]
    was = model.training
    model.eval()
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return outs


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, batches: list, forward) -> List[tuple]:
    """``[(args, kwargs)]`` per batch: what ``block`` receives during ``forward(model, batch)``
    (the pass stops there). Cache arguments are dropped and ``use_cache`` turned off."""
    got: List[tuple] = []

    def hook(mod, args, kwargs):
        kw = {k: (None if _is_cache(v) else v) for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        if "use_cache" in kw:
            kw["use_cache"] = False
        got.append((_detach(tuple(None if _is_cache(a) else a for a in args)), _detach(kw)))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    was = model.training
    model.eval()
    try:
        for b in batches:
            try:
                forward(model, b)
            except _Stop:
                pass
    finally:
        h.remove()
        model.train(was)
    if len(got) != len(batches):
        raise RuntimeError(f"block: saw {len(got)} inputs over {len(batches)} calibration batches (not used by forward?)")
    return got


def factor_parameters(block: nn.Module) -> List[nn.Parameter]:
    """Every parameter of the factorized modules inside ``block`` (each once, in module order)."""
    seen, out = set(), []
    for m in block.modules():
        if isinstance(m, FactorizedLinear):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def fit_block(block: nn.Module, inputs: List[tuple], targets: List[torch.Tensor], *, steps: int, lr: float,
              eval_every: int = EVAL_EVERY, patience: int = PATIENCE) -> Dict[str, float]:
    """Train the factorized parameters of ``block`` against ``targets`` (module docstring); returns
    ``{heldout_mse_start, heldout_mse, heldin_mse_start, heldin_mse, steps_run, best_step}``."""
    if len(inputs) != len(targets) or len(inputs) < 2:
        raise ValueError(f"inputs: expected >= 2 calibration batches with one target each, got {len(inputs)} "
                         f"inputs and {len(targets)} targets")
    params = factor_parameters(block)
    if not params:
        raise ValueError(f"block: no factorized module inside {type(block).__name__} to fit")
    n_out = max(1, round(len(inputs) / 4))
    held_in, held_out = list(range(len(inputs) - n_out)), list(range(len(inputs) - n_out, len(inputs)))

    def loss_on(idx):
        tot = 0.0
        for i in idx:
            args, kw = inputs[i]
            tot = tot + (_hidden(block(*args, **kw)).float() - targets[i].float()).pow(2).mean()
        return tot / len(idx)

    all_params = list(block.parameters())
    flags = [p.requires_grad for p in all_params]
    was = block.training
    block.eval()
    try:
        for p in all_params:
            p.requires_grad_(False)
        with torch.no_grad():
            best = float(loss_on(held_out))
            start_in = float(loss_on(held_in))
        info = dict(heldout_mse_start=best, heldin_mse_start=start_in, best_step=0, steps_run=0)
        best_state = [p.detach().clone() for p in params]
        if steps > 0:
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(relative_groups(params, lr))
            bad = 0
            for step in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():  # one held-in batch per step, in a fixed cyclic order
                    loss_on([held_in[(step - 1) % len(held_in)]]).backward()
                opt.step()
                info["steps_run"] = step
                if step % eval_every == 0 or step == steps:
                    with torch.no_grad():
                        ho = float(loss_on(held_out))
                    if ho < best:
                        best, bad, info["best_step"] = ho, 0, step
                        best_state = [p.detach().clone() for p in params]
                    else:
                        bad += 1
                        if bad >= patience:
                            break
        with torch.no_grad():
            for p, s in zip(params, best_state):
                p.copy_(s)
                p.grad = None
            info.update(heldout_mse=best, heldin_mse=float(loss_on(held_in)))
    finally:
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
        block.train(was)
    return info


def refine_blocks(model: nn.Module, block_names: List[str], targets: Dict[str, list], batches: list, forward, *,
                  steps: int, lr: float, log=None, cache=None) -> Dict[str, Dict[str, float]]:
    """Step 2 and 3 of the module docstring for each of ``block_names`` in order; returns each
    block's :func:`fit_block` summary. ``cache``: a :class:`fastfactor.compress.fitcache.FitCache`;
    a block it holds is loaded instead of fitted, and each block fitted is written to it."""
    out = {}
    for name in block_names:
        block = model.get_submodule(name)
        info = cache.load_block(name, block) if cache is not None else None  # fitted before an interrupt
        fitted = info is None
        if fitted:
            inputs = block_inputs(model, block, batches, forward)
            info = fit_block(block, inputs, targets[name], steps=steps, lr=lr)
        out[name] = info
        _dist.broadcast_module(block)  # rank 0's fit on every rank (a no-op single-process)
        if fitted and cache is not None:
            cache.save_block(name, block, info)
        if log is not None:
            log(f"  block fit {name}: held-out MSE {info['heldout_mse_start']:.4g} -> {info['heldout_mse']:.4g} "
                f"(best step {info['best_step']} of {info['steps_run']})")
    return out


def stage_blocks(group) -> List[str]:
    """The transformer blocks of a stage's targets, in model order (targets outside blocks have none)."""
    names: List[str] = []
    for t in group:
        if t.block is not None and t.block not in names:
            names.append(t.block)
    return names


def describe(config) -> str:
    """The form recorded per module in the report: ``pca (linear, scope=module)``,
    ``pca (nonlinear relu, scope=block)``."""
    form = config.ae_form + (f" {config.ae_activation}" if config.ae_form == "nonlinear" else "")
    return f"{config.resolved_init} ({form}, scope={config.scope})"


__all__ = ["block_outputs", "block_inputs", "fit_block", "refine_blocks", "factor_parameters", "stage_blocks",
           "describe", "EVAL_EVERY", "PATIENCE"]
