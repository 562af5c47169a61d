"""Autoencoder bottlenecks (Banaei et al., EACL 2023): fit a width-``r`` autoencoder on a layer's
*outputs* and fold its encoder into the weight.

For a dense layer ``y = W·x + b`` (``W (out, in)``) and calibration inputs ``X (n, in)``, the
outputs ``Y = X·Wᵀ + b`` are reproduced through a bottleneck with encoder ``E (r, out)``, encoder
bias ``c (r,)``, decoder ``D (out, r)`` and decoder bias ``d (out,)``:

* **linear**: ``ŷ = D·(E·y + c) + d = D·(E·W)·x + (D·(E·b + c) + d)``, a
  :class:`~fastfactor.layers.LowRankLinear` with ``U = D``, ``V = E·W``,
  ``bias = D·(E·b + c) + d``;
* **nonlinear**: ``ŷ = D·σ(E·y + c) + d = D·σ((E·W)·x + (E·b + c)) + d``, a
  :class:`~fastfactor.layers.bottleneck.BottleneckLinear` with ``U = D``, ``V = E·W``,
  ``cb = E·b + c``, ``bias = d``, run by the low-rank chain kernel with the activation on chip.

Closed-form start (the optimum of the linear autoencoder under MSE): with ``μ`` the mean and
``Q (out, r)`` the top-``r`` eigenvectors of the covariance of the held-in outputs, ``E = Qᵀ``,
``D = Q``, ``c = 0``, ``d = μ − Q·Qᵀ·μ``, i.e. ``ŷ = μ + Q·Qᵀ·(y − μ)``. For the nonlinear
forms the start is the same map kept in ``σ``'s near-linear range: with ``s_i`` the standard
deviation of ``z_i = (E·(y − μ))_i``, relu / gelu / silu shift the pre-activation to
``z + 3·s`` (``c = −E·μ + 3·s``, ``d = μ − 3·D·s``); tanh scales it to ``z_i / (2·s_i)``
(``E ← diag(1/(2s))·E``, ``D ← D·diag(2s)``, ``c = −E·μ``, ``d = μ``).

Refinement: Adam (relative learning rate, :func:`relative_groups`) on the held-in MSE ``mean‖ŷ − y‖²`` (full batch), through the same ops the
compressed model runs; every ``eval_every`` steps the held-out MSE is measured, and the best
held-out state (the start included, so refinement never makes the held-out error worse) is kept;
training stops after ``patience`` evaluations without improvement or ``steps`` steps.
Parameters counted as the factors: ``U`` and ``V`` (``r·(in + out)``, the ratio as low-rank).

What the nonlinear form can and cannot do: its decoder is linear, so every ``ŷ`` lies in the
``r``-dimensional affine subspace ``d + span(D)``, where the orthogonal projection is the best
point for each sample; the linear closed form *is* that projection onto the best subspace, so on
the data it is fitted to no bottleneck of this shape (nonlinear included) has a lower MSE of the
module's own output. The nonlinear form can differ on held-out tokens and, with
``scope="block"`` (:mod:`fastfactor.compress.autoencoder`), on the block's output, which is not
the module's MSE.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch

from .. import _validate as V

FORMS = ("linear", "nonlinear")


@dataclasses.dataclass
class Bottleneck:
    """An autoencoder bottleneck of one dense layer: ``E (r, out)``, ``c (r,)``, ``D (out, r)``,
    ``d (out,)`` (float32 leaves), the dense ``W (out, in)`` and ``b (out,)`` it encodes, the form
    and the activation. :meth:`factors` maps them to the layer's tensors; :meth:`layer` builds it."""

    E: torch.Tensor
    c: torch.Tensor
    D: torch.Tensor
    d: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    form: str
    act: str
    info: Dict[str, float] = dataclasses.field(default_factory=dict)

    def leaves(self):
        """The trainable tensors (``c`` is redundant with ``d`` in the linear form: not trained)."""
        return [self.E, self.D, self.d] + ([self.c] if self.form == "nonlinear" else [])

    def factors(self) -> Dict[str, torch.Tensor]:
        """``{u, v, bias[, cb]}`` of the layer (differentiable in the leaves)."""
        v = self.E @ self.W
        cb = self.E @ self.b + self.c
        if self.form == "linear":
            return {"u": self.D, "v": v, "bias": self.D @ cb + self.d}
        return {"u": self.D, "v": v, "cb": cb, "bias": self.d}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ŷ`` for inputs ``x (n, in)`` on the fused ops (what the compressed layer computes)."""
        from ..ops.lowrank_act import lowrank_act_linear

        f = self.factors()
        if self.form == "linear":
            from ..ops.lowrank import lowrank_linear

            return lowrank_linear(x, f["u"], f["v"], f["bias"])
        return lowrank_act_linear(x, f["u"], f["v"], f["bias"], f["cb"], act=self.act)

    @torch.no_grad()
    def layer(self, dtype: Optional[torch.dtype] = None):
        """The module: ``LowRankLinear`` (linear) or ``BottleneckLinear`` (nonlinear)."""
        from ..layers.bottleneck import BottleneckLinear
        from ..layers.lowrank import LowRankLinear

        f = {k: t.detach().to(dtype or self.W.dtype) for k, t in self.factors().items()}
        if self.form == "linear":
            return LowRankLinear.from_factors(f["u"], f["v"], f["bias"])
        return BottleneckLinear.from_factors(f["u"], f["v"], f["cb"], f["bias"], act=self.act)


def check_form(form: str, act: str) -> None:
    from ..kernels.lowrank_act import ACTIVATIONS

    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"ae_form: expected one of {list(FORMS)}, got {form!r}")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"ae_activation: expected one of {list(ACTIVATIONS)}, got {act!r}")


def split_rows(n: int, holdout: float, seed: int):
    """``(held-in indices, held-out indices)`` of ``n`` rows: a seeded permutation, the last
    ``max(1, round(holdout·n))`` held out (none when ``n < 2`` or ``holdout == 0``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    k = 0 if (n < 2 or holdout <= 0) else min(n - 1, max(1, round(holdout * n)))
    return perm[: n - k], perm[n - k:]


@torch.no_grad()
def closed_form(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor, rank: int,
                form: str = "linear", act: str = "relu") -> Bottleneck:
    """The closed-form start (module docstring) from inputs ``x (n, in)``, in float64, returned
    as float32 leaves."""
    W = weight.detach().to(torch.float64)
    out_f = W.shape[0]
    b = bias.detach().to(torch.float64) if bias is not None else torch.zeros(out_f, dtype=torch.float64)
    y = x.to(torch.float64) @ W.t() + b
    mu = y.mean(0)
    yc = y - mu
    cov = yc.t() @ yc / max(1, y.shape[0])
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:rank]
    Q = evecs[:, order]
    # a deterministic sign per column (eigh's is arbitrary): the largest entry positive
    sign = torch.sign(Q.gather(0, Q.abs().argmax(0, keepdim=True))).squeeze(0)
    Q = Q * torch.where(sign == 0, torch.ones_like(sign), sign)
    E, D = Q.t().clone(), Q.clone()
    c = torch.zeros(rank, dtype=torch.float64)
    d = mu - Q @ (Q.t() @ mu)
    if form == "nonlinear" and act != "identity":
        s = (yc @ Q).std(0, unbiased=False)
        s = torch.clamp(s, min=1e-6 * float(s.max().clamp(min=1e-30)) + 1e-30)
        if act == "tanh":
            a = 1.0 / (2.0 * s)
            E = E * a[:, None]
            D = D / a[None, :]
            c = -(E @ mu)
            d = mu.clone()
        else:
            c = -(E @ mu) + 3.0 * s
            d = mu - 3.0 * (D @ s)
    f32 = lambda t: t.to(torch.float32).contiguous()
    return Bottleneck(f32(E), f32(c), f32(D), f32(d), f32(W), f32(b), form, act)


def relative_groups(params, lr: float) -> list:
    """Adam parameter groups with a *relative* learning rate: each tensor's step is ``lr`` times its
    RMS at the start (a zero tensor: times the mean RMS of the others), so one ``ae_lr`` suits
    weights of any scale (a tiny model's 0.02 and a trained model's 0.05 alike)."""
    rms = [float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0 for p in params]
    nz = [r for r in rms if r > 0]
    fallback = sum(nz) / len(nz) if nz else 1.0
    return [{"params": [p], "lr": lr * (r if r > 0 else fallback)} for p, r in zip(params, rms)]


def _mse(bn: Bottleneck, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (bn.forward(x) - y).pow(2).mean()


def refine(bn: Bottleneck, x_in: torch.Tensor, y_in: torch.Tensor, x_out: torch.Tensor, y_out: torch.Tensor, *,
           steps: int, lr: float, eval_every: int = 10, patience: int = 5) -> Bottleneck:
    """Adam on the held-in MSE with early stopping on the held-out MSE (module docstring); the
    best held-out state is kept in ``bn`` (in place) and ``bn.info`` records the losses."""
    leaves = bn.leaves()
    with torch.no_grad():
        best = float(_mse(bn, x_out, y_out)) if len(x_out) else float("inf")
        start_in = float(_mse(bn, x_in, y_in))
    bn.info.update(heldout_mse_start=best, heldin_mse_start=start_in, best_step=0, steps_run=0)
    if steps <= 0 or not len(x_out):
        bn.info.update(heldout_mse=best, heldin_mse=start_in)
        return bn
    best_state = [t.detach().clone() for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    opt = torch.optim.Adam(relative_groups(leaves, lr))
    bad = 0
    step = 0
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():  # build_layer runs under no_grad
            loss = _mse(bn, x_in, y_in)
            loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                ho = float(_mse(bn, x_out, y_out))
            if ho < best:
                best, bad = ho, 0
                best_state = [t.detach().clone() for t in leaves]
                bn.info["best_step"] = step
            else:
                bad += 1
                if bad >= patience:
                    break
    with torch.no_grad():
        for t, s in zip(leaves, best_state):
            t.requires_grad_(False)
            t.copy_(s)
        bn.info.update(heldout_mse=best, heldin_mse=float(_mse(bn, x_in, y_in)), steps_run=step)
    return bn


def fit_bottleneck(weight: torch.Tensor, bias: Optional[torch.Tensor], inputs: torch.Tensor, rank: int, *,
                   form: str = "linear", act: str = "relu", steps: int = 200, lr: float = 1e-2,
                   holdout: float = 0.2, seed: int = 0, eval_every: int = 10, patience: int = 3) -> Bottleneck:
    """Fit a width-``rank`` bottleneck of ``y = weight·x + bias`` on ``inputs (n, in)`` (module
    docstring): closed-form start on the held-in rows, then :func:`refine`. Returns the
    :class:`Bottleneck`; ``.layer()`` is the compressed module."""
    V.check_tensor("weight", weight, ndim=2)
    V.check_tensor("inputs", inputs, ndim=2)
    out_f, in_f = weight.shape
    V.check_dim("inputs", inputs, 1, in_f, "in_features = weight.shape[1]")
    if bias is not None:
        V.check_tensor("bias", bias, ndim=1)
        V.check_dim("bias", bias, 0, out_f, "out_features = weight.shape[0]")
    V.check_positive_int("rank", rank, minimum=1, maximum=min(in_f, out_f))
    check_form(form, act)
    if inputs.shape[0] < 2:
        raise ValueError(f"inputs: expected at least 2 calibration rows (tokens), got {inputs.shape[0]}")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs: expected finite calibration activations, got NaN or inf")
    V.check_positive_int("steps", steps, minimum=0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a finite positive learning rate, got {lr!r}")
    if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise ValueError(f"holdout: expected a fraction in [0, 1), got {holdout!r}")
    x = inputs.detach().to(device=weight.device, dtype=torch.float32)
    i_in, i_out = split_rows(x.shape[0], holdout, seed)
    i_in, i_out = i_in.to(x.device), i_out.to(x.device)
    bn = closed_form(weight, bias, x[i_in], rank, form, act)
    bn = dataclasses.replace(bn, **{k: getattr(bn, k).to(weight.device) for k in ("E", "c", "D", "d", "W", "b")})
    with torch.no_grad():
        y = x @ bn.W.t() + bn.b
    return refine(bn, x[i_in], y[i_in], x[i_out], y[i_out], steps=steps, lr=lr, eval_every=eval_every,
                  patience=patience)


__all__ = ["Bottleneck", "FORMS", "fit_bottleneck", "closed_form", "refine", "split_rows", "check_form"]
