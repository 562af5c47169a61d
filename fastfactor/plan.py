"""Compress to a budget: per-module methods and ranks chosen from measured sensitivity, under a
parameter budget, a (predicted or measured) latency budget, or both.

Four steps, each usable alone:

1. :func:`candidate_grid` — for every target module (the driver's ``select_targets``), from shapes
   alone (a meta-device model will do): "keep dense", the low-rank ranks of a ratio grid
   (:func:`candidate_ranks`), and optionally other families (``methods=``: monarch /
   block_lowrank at ``nblocks`` x ``other_ratios``, sparse24, dense_sparse), each with its stored
   weight parameters and, given a latency model (:mod:`fastfactor.plan_latency`: the ``fastfactor
   sol`` model on a named device at ``M`` tokens, or a ``fastfactor bench`` JSON measured on a GPU),
   its time. Keeping a module dense costs ``in·out`` parameters; rank ``r`` costs ``r·(in + out)``;
   settings not smaller than the dense weight are left out.

2. :func:`score_candidates` — the **score** of each choice (cached on disk per module weight and
   activation Gram, :class:`ScoreCache`):

   * low rank with an activation Gram ``G = XᵀX`` (``(in, in)``, e.g. from
     :func:`fastfactor.compress.calibration.collect_activation_stats`): let ``S`` be its Cholesky
     factor (``S·Sᵀ = G``, :func:`fastfactor.factorize.data_aware.whitening_factor`) and
     ``σ₁ ≥ σ₂ ≥ …`` the singular values of ``W·S`` (``W``: the ``(out, in)`` weight). The best rank-r
     approximation in the whitened norm (what ``init="activation"`` computes) has error

         score(r) = min_{rank(W')≤r} ‖(W − W')·S‖_F² = ‖(W − W')·Xᵀ‖_F² = Σ_{i>r} σᵢ²

     i.e. the summed squared output error of the module over the calibration tokens (Eckart–Young
     on ``W·S``; closed form, one SVD per module, no factor built); without a Gram (``init="svd"``)
     the same with ``S = I``, the SVD tail energy of ``W``;
   * the other families: the module factorized with the init the plan will run (:func:`score_init`)
     and ``‖(W − Ŵ)·S‖_F²`` measured on its ``dense_weight()``;
   * or (:func:`output_scores`) the change of the model's output over calibration batches when only
     that module is compressed that way.

3. :func:`solve` — the choice per module minimizing ``Σ score`` subject to ``Σ params ≤ B_p`` and/or
   ``Σ seconds ≤ B_t`` (a multiple-choice knapsack), by dynamic programming: 1-D for one budget,
   2-D for both (each budget alone is solved first; when that optimum meets the other budget it is
   the optimum of the pair). Costs are counted above each module's cheapest choice. On the exact
   grid (integer costs over their gcd, when the capacity fits ``max_cells``) the answer is optimal;
   otherwise every cost is rounded *up* to a grid unit (so no budget is ever exceeded), a second DP
   with costs rounded *down* gives ``score_lower_bound`` (no plan within the budgets scores less),
   a greedy pass with the true costs spends what the rounding left, and ``exact`` says whether the
   answer reaches the bound (proven optimal).

4. :class:`BudgetPlan` — the result as data (per module: name, method, rank / blocks, params, score,
   time, init; the budgets and the latency source), with a JSON round trip (version 2; version 1
   loads), a table, and :meth:`BudgetPlan.to_configs`: one :class:`~fastfactor.CompressionConfig`
   dict per method whose ``targets`` are its modules and whose ``module_ratios`` give each exactly
   its planned setting; :meth:`BudgetPlan.run_config` the one run of a plan mixing methods.
   ``compress(..., plan=)`` / ``fastfactor compress --plan`` and :func:`apply_plan` execute it.

``target_params``: a ``float`` in ``(0, 1]`` is a fraction of the targets' dense weight parameters;
an ``int >= 1`` is an absolute count. ``target_latency``: a fraction in ``(0, 1]`` of the targets'
dense time under the latency model, or with ``latency_scope="model"`` of the whole model's
(:func:`whole_model_latency`: the other linears, the attention core and the rest under the stated
model of :func:`fastfactor.plan_latency.rest_seconds`); the whole-model fraction is reported either way.
Bad budgets (bool, NaN, ≤ 0, a float > 1, unreachable alone or together) raise before any weight
is read (:func:`check_budgets`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .plan_data import (PLAN_METHODS, PLAN_VERSION, PREDICTED, BudgetPlan, PlanEntry, _ratio_for,  # noqa: F401
                        as_plan, check_plan)

#: default grid: the ranks of these ratios (fraction of each module's dense weight parameters kept)
DEFAULT_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: the DP grid is coarsened beyond this many capacity cells
MAX_CELLS = 200_000
#: the two-budget DP's cells (parameter cells x latency cells)
MAX_CELLS_2D = 1_000_000


@dataclass
class Choice:
    method: str  #: "lowrank" or "dense"
    rank: Optional[int]  #: None for "dense"
    params: int  #: weight parameters this choice stores
    score: Optional[float]  #: its predicted error (see the module docstring); 0 for "dense"; None: not scored yet
    seconds: Optional[float] = None  #: its time under the latency model (None: no latency model)
    nblocks: Optional[int] = None  #: monarch / block_lowrank block count


@dataclass
class ModuleCandidates:
    name: str
    in_features: int
    out_features: int
    choices: List[Choice]  #: "dense" first, then the ranks in increasing order

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features


def candidate_ranks(in_features: int, out_features: int, ratios: Sequence[float] = DEFAULT_RATIOS,
                    ranks: Optional[Sequence[int]] = None) -> List[int]:
    """Sorted distinct ranks ``r`` with ``1 <= r <= min(in, out)`` and ``r·(in+out) < in·out``:
    ``ranks`` when given, else ``rank_for_ratio`` of each ratio."""
    from .factorize.svd import rank_for_ratio

    if ranks is None:
        rs = [rank_for_ratio(in_features, out_features, float(q)) for q in ratios]
    else:
        rs = []
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
                raise ValueError(f"ranks: expected positive ints, got {r!r}")
            rs.append(int(r))
    lim = min(in_features, out_features)
    return sorted({r for r in rs if r <= lim and r * (in_features + out_features) < in_features * out_features})


def tail_energies(weight: torch.Tensor, gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t`` (float64, length ``min(out, in) + 1``) with ``t[r] = Σ_{i>r} σᵢ²``, ``σ`` the singular
    values of ``W·S`` (``S·Sᵀ = gram``) or of ``W`` when ``gram`` is None: ``t[r]`` is the squared
    (whitened) Frobenius error of the best rank-``r`` approximation of ``weight`` (``(out, in)``)."""
    from .factorize.data_aware import whitening_factor

    w = weight.detach().to(torch.float64)
    if gram is not None:
        if tuple(gram.shape) != (w.shape[1], w.shape[1]):
            raise ValueError(f"gram: expected shape ({w.shape[1]}, {w.shape[1]}), got {tuple(gram.shape)}")
        S, _ = whitening_factor(gram.to(w.device))
        w = w @ S
    s2 = torch.linalg.svdvals(w).pow(2)
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[i] = Σ_{j>=i} σⱼ²
    return torch.cat([tail, tail.new_zeros(1)])


#: methods the planner can put in the grid besides "dense" and "lowrank"
OTHER_METHODS = ("monarch", "block_lowrank", "sparse24", "dense_sparse")
#: ratios of the grid for the other methods (each factorized to be scored: kept short)
OTHER_RATIOS = (0.1, 0.25, 0.5)
#: block counts of the grid for monarch / block_lowrank
DEFAULT_NBLOCKS = (2, 4)


def _bias(model, name) -> bool:
    from .compress.targets import get_module

    return getattr(get_module(model, name), "bias", None) is not None


def _other_choices(method: str, i: int, o: int, ratios, nblocks) -> List[Choice]:
    """Unscored choices of ``method`` for an ``(o, i)`` weight: distinct settings storing fewer
    parameters than the dense weight (parameter counts from the layer built on the meta device)."""
    from .families import get_family
    from .plan_latency import build_layer, make_spec

    fam = get_family(method)
    specs = []
    if method == "sparse24":
        specs.append(make_spec(method, i, o))
    elif method == "dense_sparse":
        specs += [make_spec(method, i, o, rank=r) for r in sorted({fam.rank_for_ratio(i, o, q) for q in ratios})]
    else:
        for b in nblocks:
            if b > min(i, o):
                continue
            rs = sorted({fam.rank_for_ratio(i, o, q, nblocks=b) for q in ratios})
            specs += [make_spec(method, i, o, nblocks=b, block_rank=r) for r in rs]
    out = []
    for sp in specs:
        try:
            try:
                p = int(build_layer(sp, torch.float32, torch.device("meta")).num_weight_params)
            except (RuntimeError, NotImplementedError):  # a constructor that computes (2:4 packing)
                p = int(build_layer(sp, torch.float32, torch.device("cpu")).num_weight_params)
        except ValueError:  # the family does not take this shape (2:4 needs in % 4 == 0)
            continue
        if p < i * o:
            out.append(Choice(method, sp["rank"] if sp["rank"] is not None else sp["block_rank"], p, None,
                              nblocks=sp["nblocks"]))
    return out


def _spec_of(c: "ModuleCandidates", ch: Choice, bias: bool) -> dict:
    from .plan_latency import make_spec

    if ch.method in ("monarch", "block_lowrank"):
        return make_spec(ch.method, c.in_features, c.out_features, bias=bias, nblocks=ch.nblocks, block_rank=ch.rank)
    return make_spec(ch.method, c.in_features, c.out_features, bias=bias, rank=ch.rank)


def candidate_grid(model: nn.Module, targets, *, ratios: Sequence[float] = DEFAULT_RATIOS,
                   ranks: Optional[Sequence[int]] = None, methods: Sequence[str] = ("lowrank",),
                   other_ratios: Sequence[float] = OTHER_RATIOS, nblocks: Sequence[int] = DEFAULT_NBLOCKS,
                   latency=None) -> List[ModuleCandidates]:
    """The candidates of every target from shapes alone (``model`` may live on the meta device):
    "dense", the low-rank ranks (:func:`candidate_ranks`) and, for each other method of
    ``methods``, its settings at ``other_ratios`` (``nblocks`` for monarch / block_lowrank); scores
    left ``None``. With ``latency`` (a :class:`fastfactor.plan_latency.LatencyModel`) every
    choice gets its time; a choice the model cannot cost (a bench file without its row) is left out."""
    methods = tuple(methods)
    for m in methods:
        if m not in ("lowrank",) + OTHER_METHODS:
            raise ValueError(f"methods: expected names from {['lowrank', *OTHER_METHODS]}, got {m!r}")
    out = []
    for t in targets:
        i, o = t.in_features, t.out_features
        choices = [Choice("dense", None, i * o, 0.0)]
        if "lowrank" in methods:
            choices += [Choice("lowrank", r, r * (i + o), None) for r in candidate_ranks(i, o, ratios, ranks)]
        for m in methods:
            if m != "lowrank":
                choices += _other_choices(m, i, o, other_ratios, nblocks)
        out.append(ModuleCandidates(t.name, i, o, choices))
    if latency is not None:
        specs = [(c, ch, _spec_of(c, ch, _bias(model, c.name))) for c in out for ch in c.choices]
        secs = latency.costs([s for _, _, s in specs])
        for (c, ch, _), t in zip(specs, secs):
            ch.seconds = None if t is None else float(t)
        for c in out:
            c.choices = [ch for ch in c.choices if ch.seconds is not None]
    return out


def _whitened_error(w: torch.Tensor, w_hat: torch.Tensor, gram: Optional[torch.Tensor]) -> float:
    """``‖(W − Ŵ)·S‖_F² = tr(E·G·Eᵀ)`` (``G = S·Sᵀ``), or ``‖W − Ŵ‖_F²`` without a Gram."""
    e = (w.detach().to(torch.float64) - w_hat.detach().to(torch.float64))
    if gram is None:
        return float(e.pow(2).sum())
    return float(((e @ gram.to(torch.float64)) * e).sum())


def score_init(method: str, whitened: bool) -> str:
    """The init each method is scored (and then executed) with."""
    return {"lowrank": "activation" if whitened else "svd", "sparse24": "activation" if whitened else "magnitude",
            "dense_sparse": "svd", "monarch": "projection", "block_lowrank": "projection"}[method]


#: bump when a scoring formula changes: cached scores of older versions are not used
SCORE_VERSION = 1


def _fingerprint(weight: torch.Tensor, gram: Optional[torch.Tensor]) -> str:
    """Content hash of one module's weight and (if any) its activation Gram: the key of its scores
    in the on-disk cache (same model + same calibration set → same key)."""
    import hashlib

    h = hashlib.sha256(f"v{SCORE_VERSION}".encode())
    for t in (weight, gram):
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.float().numpy().tobytes())
    return h.hexdigest()[:40]


def _choice_key(ch: Choice, init: str) -> str:
    return f"{ch.method}|{ch.rank}|{ch.nblocks}|{init}"


class ScoreCache:
    """Scores per module fingerprint (:func:`_fingerprint`) on disk: ``DIR/scores/KEY.json`` holding
    the low-rank tail energies and the other methods' scores per (method, rank, nblocks, init).
    ``directory=None``: ``$FASTFACTOR_PLAN_CACHE`` or ``~/.cache/fastfactor/plan``. ``hits`` /
    ``misses`` count modules served whole from the cache / scored (at least partly) afresh."""

    def __init__(self, directory: Optional[str] = None):
        from .plan_latency import cache_dir

        self.dir = os.path.join(directory or cache_dir(), "scores")
        self.hits = self.misses = 0

    def load(self, key: str) -> dict:
        try:
            with open(os.path.join(self.dir, key + ".json")) as f:
                d = json.load(f)
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def save(self, key: str, entry: dict) -> None:
        from ._io import atomic_write_text

        try:
            os.makedirs(self.dir, exist_ok=True)
            atomic_write_text(os.path.join(self.dir, key + ".json"), json.dumps(entry))
        except OSError:
            pass


def score_candidates(model: nn.Module, candidates: List[ModuleCandidates], grams: Optional[Dict[str, object]] = None,
                     cache=True) -> List[ModuleCandidates]:
    """Fill every choice's score (module docstring): low-rank in closed form from the singular
    values of ``W·S``; the other methods by factorizing with their scoring init
    (:func:`score_init`) and measuring ``‖(W − Ŵ)·S‖_F²``. Reads the weights, changes nothing.
    ``cache``: ``True`` (the default on-disk :class:`ScoreCache`), a :class:`ScoreCache`, a
    directory, or ``False``: scores are reused per (module weight, Gram) fingerprint, so planning
    the same model and calibration set again at other budgets skips every SVD and factorization."""
    from .compress.config import CompressionConfig
    from .compress.methods import build_layer
    from .compress.targets import dense_view, get_module

    if grams is not None:
        missing = [c.name for c in candidates if c.name not in grams]
        if missing:
            raise ValueError(f"grams: expected a Gram matrix for every target, missing {missing}")
    if cache is True:
        cache = ScoreCache()
    elif isinstance(cache, (str, os.PathLike)):
        cache = ScoreCache(os.fspath(cache))
    elif cache is not False and cache is not None and not isinstance(cache, ScoreCache):
        raise TypeError(f"cache: expected True/False, a directory or a ScoreCache, got {type(cache).__name__}")
    for c in candidates:
        view = dense_view(get_module(model, c.name), c.name)
        g = None
        if grams is not None:
            g = grams[c.name]
            g = g[0] if isinstance(g, tuple) else g
        key = _fingerprint(view.weight, g) if cache else None
        entry = cache.load(key) if cache else {}
        dirty = False
        tail = entry.get("tail")
        scores = entry.setdefault("choices", {})
        for ch in c.choices:
            if ch.method == "dense":
                ch.score = 0.0
            elif ch.method == "lowrank":
                if tail is None:
                    tail = [float(x) for x in tail_energies(view.weight, g)]
                    entry["tail"], dirty = tail, True
                ch.score = float(tail[ch.rank])
            else:
                from .families import get_family

                init = score_init(ch.method, g is not None)
                ck = _choice_key(ch, init)
                if ck in scores:
                    ch.score = float(scores[ck])
                    continue
                entry_ = PlanEntry(c.name, ch.method, ch.rank, ch.params, 0.0, c.in_features, c.out_features,
                                   nblocks=ch.nblocks)
                ratio = _ratio_for(entry_, get_family(ch.method))
                cfg = CompressionConfig(method=ch.method, nblocks=ch.nblocks or 4, init=init)
                stats = {"gram": g} if g is not None else {}
                layer = build_layer(ch.method, view, ratio, init, cfg, stats)
                if int(layer.num_weight_params) != ch.params:
                    raise ValueError(f"module {c.name!r}: {ch.method} built {layer.num_weight_params} weight "
                                     f"parameters, planned {ch.params}")
                ch.score = _whitened_error(view.weight, layer.dense_weight(), g)
                scores[ck], dirty = ch.score, True
        if cache and dirty:
            cache.misses += 1
            cache.save(key, entry)
        elif cache:
            cache.hits += 1
    return candidates


def _lowrank_reconstructions(weight: torch.Tensor, gram: Optional[torch.Tensor]):
    """``r -> Ŵ_r`` (float64, ``(out, in)``): the best rank-``r`` approximation of ``weight`` in the
    whitened norm (what ``init="activation"`` builds; plain SVD without ``gram``), from one SVD:
    ``Ŵ_r = U_r·Σ_r·V_rᵀ·S⁻¹`` with ``W·S = U·Σ·Vᵀ`` (``S⁻¹`` applied once to ``Vᵀ``, so each rank
    costs one ``(out, r)·(r, in)`` product)."""
    from .factorize.data_aware import whitening_factor

    w = weight.detach().to(torch.float64)
    S = None
    if gram is not None:
        S, _ = whitening_factor(gram.to(w.device))
        w = w @ S
    U, sig, Vh = torch.linalg.svd(w, full_matrices=False)
    if S is not None:  # Vᵀ·S⁻¹ = (S⁻ᵀ·V)ᵀ: one solve for every rank
        Vh = torch.linalg.solve(S.t(), Vh.t()).t()

    def at(r: int) -> torch.Tensor:
        return (U[:, :r] * sig[:r]) @ Vh[:r]

    return at


#: bump when the output-score formula changes: cached output scores of older versions are not used
OUTPUT_SCORE_VERSION = 1


def _tensor_digest(h, t) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())


def _batch_digest(h, b) -> None:
    if isinstance(b, torch.Tensor):
        _tensor_digest(h, b)
    elif isinstance(b, dict):
        for k in sorted(b):
            h.update(str(k).encode())
            _batch_digest(h, b[k])
    elif isinstance(b, (list, tuple)):
        h.update(f"seq{len(b)}".encode())
        for x in b:
            _batch_digest(h, x)
    else:
        h.update(repr(b).encode())


def forward_key(forward) -> str:
    """A stable name of a forward callable for the output-score cache key: ``"default"`` for
    None, else its module, qualified name and code (bytecode and constants)."""
    if forward is None:
        return "default"
    code = getattr(forward, "__code__", None)
    parts = [getattr(forward, "__module__", ""), getattr(forward, "__qualname__", type(forward).__qualname__)]
    if code is not None:
        parts += [code.co_code.hex(), repr(code.co_consts), repr(code.co_names)]
    return "|".join(map(str, parts))


def output_cache_key(model: nn.Module, batches: Sequence, forward=None, grams=None) -> str:
    """The key of :func:`output_scores`' on-disk cache: a hash of the whole model's state (every
    parameter and buffer: the output change depends on every layer), the calibration batches'
    contents, the Grams (they fix the whitened reconstructions) and the forward (:func:`forward_key`).
    Other calibration data, another seed's batches, or another model give another key."""
    import hashlib

    h = hashlib.sha256(f"output-v{OUTPUT_SCORE_VERSION}".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        _tensor_digest(h, v)
    h.update(f"batches{len(batches)}".encode())
    for b in batches:
        _batch_digest(h, b)
    for name in sorted(grams or {}):
        g = grams[name]
        h.update(name.encode())
        _tensor_digest(h, g[0] if isinstance(g, tuple) else g)
    h.update(forward_key(forward).encode())
    return h.hexdigest()[:40]


def _as_cache(cache):
    if cache is True:
        return ScoreCache()
    if isinstance(cache, (str, os.PathLike)):
        return ScoreCache(os.fspath(cache))
    if cache is False or cache is None or isinstance(cache, ScoreCache):
        return cache or None
    raise TypeError(f"cache: expected True/False, a directory or a ScoreCache, got {type(cache).__name__}")


def output_scores(model: nn.Module, candidates: List[ModuleCandidates], batches: Sequence, forward=None,
                  grams: Optional[Dict[str, object]] = None, cache=False) -> List[ModuleCandidates]:
    """Replace every choice's score by the **change of the model's output** when only that module is
    compressed that way: ``Σ_batches ‖f(x) − f_dense(x)‖_F²`` with ``f = forward(model, batch)`` (a
    tensor; default: ``model(**batch)``'s ``logits`` or ``last_hidden_state``). The module's weight
    is swapped for its reconstruction (low rank: :func:`_lowrank_reconstructions`, whitened when
    ``grams`` are given; other methods: their scoring init's ``dense_weight()``) and restored; the
    model is unchanged afterwards. One forward per batch per choice: costlier than the weight
    scores, and the solver still adds the per-module changes (they interact in the real model).

    ``cache`` (``True``, a directory or a :class:`ScoreCache`; default off): scores stored on disk
    under :func:`output_cache_key` (model state + calibration batches + Grams + forward), one entry
    per module and choice, written after every module (a cut-off run keeps what it scored)."""
    from .compress.config import CompressionConfig
    from .compress.methods import build_layer
    from .compress.targets import dense_view, get_module
    from .families import get_family

    cache = _as_cache(cache)
    if forward is None:
        fwd_key = None

        def forward(m, b):
            out = m(**b) if isinstance(b, dict) else m(b)
            for k in ("logits", "last_hidden_state"):
                if hasattr(out, k):
                    return getattr(out, k)
            return out[0] if isinstance(out, (tuple, list)) else out
    else:
        fwd_key = forward
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one calibration batch")
    key = output_cache_key(model, batches, fwd_key, grams) if cache else None
    entry = cache.load("out-" + key) if cache else {}
    stored = entry.setdefault("choices", {})
    was_training = model.training
    model.eval()
    ref = None
    try:
        with torch.no_grad():
            for c in candidates:
                mod = get_module(model, c.name)
                view = dense_view(mod, c.name)
                g = None
                if grams is not None:
                    g = grams[c.name]
                    g = g[0] if isinstance(g, tuple) else g
                w0 = mod.weight.detach().clone()
                conv = type(mod).__name__ == "Conv1D"  # GPT-2: weight stored (in, out)
                recon = None
                dirty = False
                for ch in c.choices:
                    if ch.method == "dense":
                        ch.score = 0.0
                        continue
                    init = score_init(ch.method, g is not None)
                    ck = c.name + "|" + _choice_key(ch, init)
                    if ck in stored:
                        ch.score = float(stored[ck])
                        continue
                    if ref is None:
                        ref = [forward(model, b).detach().to(torch.float64) for b in batches]
                    if ch.method == "lowrank":
                        recon = recon or _lowrank_reconstructions(view.weight, g)
                        w_hat = recon(ch.rank)
                    else:
                        e = PlanEntry(c.name, ch.method, ch.rank, ch.params, 0.0, c.in_features, c.out_features,
                                      nblocks=ch.nblocks)
                        cfg = CompressionConfig(method=ch.method, nblocks=ch.nblocks or 4, init=init)
                        layer = build_layer(ch.method, view, _ratio_for(e, get_family(ch.method)), init, cfg,
                                            {"gram": g} if g is not None else {})
                        w_hat = layer.dense_weight().detach()
                    mod.weight.copy_((w_hat.t() if conv else w_hat).to(w0.dtype))
                    try:
                        ch.score = float(sum((forward(model, b).detach().to(torch.float64) - r).pow(2).sum()
                                             for b, r in zip(batches, ref)))
                    finally:
                        mod.weight.copy_(w0)
                    stored[ck], dirty = ch.score, True
                if cache and dirty:
                    cache.save("out-" + key, entry)
        if cache:
            if ref is None:
                cache.hits += 1
            else:
                cache.misses += 1
    finally:
        model.train(was_training)
    return candidates


def sensitivity(model: nn.Module, config=None, *, grams: Optional[Dict[str, object]] = None,
                ratios: Sequence[float] = DEFAULT_RATIOS, ranks: Optional[Sequence[int]] = None,
                targets=None, methods: Sequence[str] = ("lowrank",), latency=None, cache=True,
                **grid) -> List[ModuleCandidates]:
    """Candidates and scores of every target of ``model`` (see the module docstring).

    ``config``: a CompressionConfig (or dict / path) whose ``targets`` / ``exclude`` pick the modules
    (as in the driver); ``grams``: ``{module name: G}`` or the ``{name: (G, tokens)}`` of
    ``collect_activation_stats``; every target must have one when given. ``targets``: a precomputed
    list of :class:`~fastfactor.compress.targets.Target` (skips the selection). ``methods``,
    ``latency`` and ``grid`` (``other_ratios``, ``nblocks``): :func:`candidate_grid`. Reads the
    weights, changes nothing."""
    from .api import _chosen_targets, _config

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if targets is None:
        targets = _chosen_targets(model, _config(config), None)
    if grams is not None:
        missing = [t.name for t in targets if t.name not in grams]
        if missing:
            raise ValueError(f"grams: expected a Gram matrix for every target, missing {missing}")
    cands = candidate_grid(model, targets, ratios=ratios, ranks=ranks, methods=methods, latency=latency, **grid)
    return score_candidates(model, cands, grams, cache=cache)


def resolve_budget(target_params, total: int, minimum: int) -> int:
    """The absolute parameter budget of ``target_params`` (see the module docstring) for targets
    holding ``total`` dense weight parameters, whose cheapest plan stores ``minimum``."""
    if isinstance(target_params, bool) or not isinstance(target_params, (int, float, np.integer, np.floating)):
        raise TypeError(f"target_params: expected a fraction (float in (0, 1]) or a count (int >= 1), "
                        f"got {type(target_params).__name__} {target_params!r}")
    if isinstance(target_params, (float, np.floating)):
        if not math.isfinite(target_params):
            raise ValueError(f"target_params: expected a finite fraction in (0, 1], got {target_params}")
        if not 0 < target_params <= 1:
            raise ValueError(f"target_params: expected a fraction in (0, 1] of the targets' {total:,} weight "
                             f"parameters (an int for an absolute count), got {target_params}")
        budget = math.floor(target_params * total)
    else:
        budget = int(target_params)
        if budget < 1:
            raise ValueError(f"target_params: expected an absolute count >= 1, got {budget}")
    if budget < minimum:
        raise ValueError(f"target_params: budget {budget:,} parameters is unreachable: the smallest candidate "
                         f"plan stores {minimum:,} of the targets' {total:,} (add smaller ranks, or raise it)")
    return budget


def resolve_latency(target_latency, dense_s: Optional[float] = None, minimum_s: Optional[float] = None,
                    where: str = "") -> Optional[float]:
    """The latency budget in seconds of ``target_latency``, a fraction in ``(0, 1]`` of the targets'
    dense time ``dense_s``; ``minimum_s``: the fastest candidate plan's time. ``where`` names the
    latency source in the error (device, tokens, predicted or measured). Without ``dense_s`` only
    the value is checked (None returned)."""
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float, np.integer, np.floating)):
        raise TypeError(f"target_latency: expected a fraction in (0, 1] of the dense targets' time, "
                        f"got {type(target_latency).__name__} {target_latency!r}")
    f = float(target_latency)
    if not math.isfinite(f) or not 0 < f <= 1:
        dense = "" if dense_s is None else f" ({dense_s * 1e6:.4g} us{where})"
        raise ValueError(f"target_latency: expected a fraction in (0, 1] of the dense targets' time{dense}, "
                         f"got {target_latency}")
    if dense_s is None:
        return None
    budget = f * dense_s
    if minimum_s is not None and minimum_s > budget * (1 + 1e-12):
        raise ValueError(f"target_latency: budget {f:g} x {dense_s * 1e6:.4g} us = {budget * 1e6:.4g} us is "
                         f"unreachable: the fastest candidate plan takes {minimum_s * 1e6:.4g} us "
                         f"({minimum_s / dense_s:.3f} of dense){where} (raise it, use more tokens, or other ranks)")
    return budget


_FUZZ = 1e-12


def _grid(values, budget, max_cells: int):
    """A cost grid for one budget dimension: ``(unit, cap, exact)``. Integer costs use their gcd
    (``exact`` when the capacity fits ``max_cells``); else ``unit = budget / max_cells``."""
    if all(float(v).is_integer() for v in values) and float(budget).is_integer():
        g = 0
        for v in values:
            g = math.gcd(g, int(v))
        g = max(1, g)
        if int(budget) // g <= max_cells:
            return g, int(budget) // g, True
    unit = float(budget) / max_cells if budget > 0 else 1.0
    return unit, max_cells if budget > 0 else 0, False


def _costs(values, unit, exact: bool, up: bool):
    if exact:
        return [int(v) // unit for v in values]
    if up:
        return [math.ceil(v / unit * (1 + _FUZZ)) for v in values]
    return [math.floor(v / unit * (1 - _FUZZ)) for v in values]


def _dp(cp: List[List[int]], ct: List[List[int]], scores: List[List[float]], cap_p: int, cap_t: int,
        back: bool = True):
    """Multiple-choice knapsack over two integer cost dimensions: one index per group minimizing
    ``Σ score`` with ``Σ cp ≤ cap_p`` and ``Σ ct ≤ cap_t``. Returns ``(picks or None, best score)``
    (``picks`` only when ``back``)."""
    n = len(cp)
    dp = np.zeros((cap_p + 1, cap_t + 1))  # dp[a, b]: min score of the groups so far within (a, b) units
    backs = []
    for m in range(n):
        new = np.full_like(dp, np.inf)
        arg = np.zeros(dp.shape, dtype=np.int16) if back else None
        for j, (wp, wt, s) in enumerate(zip(cp[m], ct[m], scores[m])):
            if wp > cap_p or wt > cap_t or not math.isfinite(s):
                continue
            val = dp[: cap_p + 1 - wp, : cap_t + 1 - wt] + s
            sub = new[wp:, wt:]
            better = val < sub
            sub[better] = val[better]
            if back:
                arg[wp:, wt:][better] = j
        dp = new
        if back:
            backs.append(arg)
    best = float(dp[cap_p, cap_t])
    if not math.isfinite(best):
        return None, best
    if not back:
        return None, best
    picks, a, b = [0] * n, cap_p, cap_t
    for m in range(n - 1, -1, -1):
        j = int(backs[m][a, b])
        picks[m] = j
        a -= cp[m][j]
        b -= ct[m][j]
    return picks, best


def _improve(P, T, S, picks, bp, bt):
    """Greedy repair of a coarse-grid answer with the true costs: the single switch of least score
    that stays within both budgets, repeated while one lowers the score."""
    picks = list(picks)
    used_p = sum(P[m][j] for m, j in enumerate(picks))
    used_t = sum(T[m][j] for m, j in enumerate(picks))
    for _ in range(50 * len(picks)):
        best = None
        for m, j0 in enumerate(picks):
            for j in range(len(S[m])):
                gain = S[m][j0] - S[m][j]
                if gain <= 0:
                    continue
                np_, nt = used_p - P[m][j0] + P[m][j], used_t - T[m][j0] + T[m][j]
                if np_ <= bp and nt <= bt * (1 + 1e-12) and (best is None or gain > best[0]):
                    best = (gain, m, j, np_, nt)
        if best is None:
            break
        _, m, j, used_p, used_t = best
        picks[m] = j
    return picks


def solve(candidates: List[ModuleCandidates], target_params=None, target_latency=None, *,
          max_cells: int = MAX_CELLS, max_cells_2d: int = MAX_CELLS_2D, latency_info: Optional[dict] = None
          ) -> "BudgetPlan":
    """The per-module choice of least total score within ``target_params`` and/or ``target_latency``
    (see the module docstring). ``target_latency`` needs every choice's ``seconds``."""
    if not candidates:
        raise ValueError("candidates: expected at least one module")
    if target_params is None and target_latency is None:
        raise ValueError("target_params / target_latency: expected at least one budget, got neither")
    total = sum(c.dense_params for c in candidates)
    P = [[ch.params for ch in c.choices] for c in candidates]
    S = [[ch.score for ch in c.choices] for c in candidates]
    for c in candidates:
        for ch in c.choices:
            if ch.score is None or not math.isfinite(ch.score):
                raise ValueError(f"candidates: module {c.name!r} choice {ch.method} rank {ch.rank}: "
                                 f"expected a finite score, got {ch.score!r}")
    bp = None
    if target_params is not None:
        bp = resolve_budget(target_params, total, sum(min(p) for p in P))
    bt, lat = None, None
    if target_latency is not None:
        for c in candidates:
            if any(ch.seconds is None for ch in c.choices):
                raise ValueError(f"target_latency: module {c.name!r} has choices without a time "
                                 "(pass latency= to the planner)")
        T = [[float(ch.seconds) for ch in c.choices] for c in candidates]
        dense_s = sum(next(ch.seconds for ch in c.choices if ch.method == "dense") for c in candidates)
        info = dict(latency_info or {})
        where = ""
        if info:
            where = (f" on {info.get('device', '?')} at M={info.get('tokens', '?')} tokens, "
                     f"{info.get('direction', 'fwd')}, {info.get('status', PREDICTED)}")
        bt = resolve_latency(target_latency, dense_s, sum(min(t) for t in T), where)
        lat = dict(info, fraction=float(target_latency), budget_s=bt, dense_s=dense_s)
    else:
        T = [[0.0] * len(c.choices) for c in candidates]

    # every module takes exactly one choice: grid the costs above each module's cheapest (exact
    # shift; the grid then spans only the budget left after the cheapest plan)
    P0 = [[p - min(ps) for p in ps] for ps in P]
    T0 = [[t - min(ts) for t in ts] for ts in T]
    bp0 = None if bp is None else bp - sum(min(ps) for ps in P)
    bt0 = None if bt is None else max(0.0, bt - sum(min(ts) for ts in T))

    def one(dim):  # 1-D problem on "p" or "t": (picks, lower bound, exact)
        vals, budget = (P0, bp0) if dim == "p" else (T0, bt0)
        unit, cap, exact = _grid([v for vs in vals for v in vs], budget, max_cells)
        up = [_costs(vs, unit, exact, True) for vs in vals]
        zero = [[0] * len(vs) for vs in vals]
        picks, best = _dp(up, zero, S, cap, 0)
        if exact:
            return picks, best, True
        dn = [_costs(vs, unit, exact, False) for vs in vals]
        _, lb = _dp(dn, zero, S, int(math.floor(budget / unit * (1 + _FUZZ))), 0, back=False)
        if picks is None:  # rounding lost every plan: start from the cheapest one (feasible)
            picks = [min(range(len(vs)), key=lambda j: (vs[j], S[m][j])) for m, vs in enumerate(vals)]
        return picks, lb, False

    inf_p = bp if bp is not None else sum(max(p) for p in P)
    inf_t = bt if bt is not None else sum(max(t) for t in T) + 1.0
    lower, picks, grid_exact = -math.inf, None, False

    def feasible(pk):
        return (sum(P[m][j] for m, j in enumerate(pk)) <= inf_p
                and sum(T[m][j] for m, j in enumerate(pk)) <= inf_t * (1 + 1e-12))

    dims = [d for d, b in (("p", bp), ("t", bt)) if b is not None]
    for d in dims:  # each budget alone is a relaxation of the pair
        pk, lb, ex = one(d)
        lower = max(lower, lb)
        if pk is not None and feasible(pk):
            picks, grid_exact = pk, ex
            break
    if picks is None and len(dims) == 2:  # both bind: the 2-D knapsack
        vp = [v for vs in P0 for v in vs]
        vt = [v for vs in T0 for v in vs]
        side = int(math.isqrt(max_cells_2d))
        up_p, cap_p, ex_p = _grid(vp, bp0, max_cells_2d)
        up_t, cap_t, ex_t = _grid(vt, bt0, max_cells_2d)
        if (cap_p + 1) * (cap_t + 1) > max_cells_2d:
            if ex_p and cap_p + 1 <= side:
                up_t, cap_t, ex_t = _grid(vt, bt0, max(1, max_cells_2d // (cap_p + 1) - 1))
            elif ex_t and cap_t + 1 <= side:
                up_p, cap_p, ex_p = _grid(vp, bp0, max(1, max_cells_2d // (cap_t + 1) - 1))
            else:
                up_p, cap_p, ex_p = _grid(vp, bp0, side - 1)
                up_t, cap_t, ex_t = _grid(vt, bt0, side - 1)
        cp = [_costs(vs, up_p, ex_p, True) for vs in P0]
        ct = [_costs(vs, up_t, ex_t, True) for vs in T0]
        pk, best = _dp(cp, ct, S, cap_p, cap_t)
        grid_exact = ex_p and ex_t
        if not grid_exact:
            cpd = [_costs(vs, up_p, ex_p, False) for vs in P0]
            ctd = [_costs(vs, up_t, ex_t, False) for vs in T0]
            _, lb = _dp(cpd, ctd, S, cap_p if ex_p else int(math.floor(bp0 / up_p * (1 + _FUZZ))),
                        cap_t if ex_t else int(math.floor(bt0 / up_t * (1 + _FUZZ))), back=False)
            if math.isinf(lb):
                raise ValueError("target_params and target_latency: unreachable together: no candidate plan "
                                 f"stores at most {bp:,} parameters and takes at most {bt * 1e6:.4g} us")
            lower = max(lower, lb)
        else:
            lower = max(lower, best)
        if pk is None and not grid_exact:  # rounding lost every plan: the fastest within the parameters
            unit, cap, ex = _grid(vp, bp0, max_cells)
            zero = [[0] * len(vs) for vs in P0]
            fast, _ = _dp([_costs(vs, unit, ex, True) for vs in P0], zero, T, cap, 0)
            if fast is not None and feasible(fast):
                pk = fast
        if pk is None:
            if grid_exact:
                raise ValueError("target_params and target_latency: unreachable together: no candidate plan "
                                 f"stores at most {bp:,} parameters and takes at most {bt * 1e6:.4g} us")
            raise ValueError(f"target_params and target_latency: too tight for the solver's grid (units "
                             f"{up_p:g} parameters x {up_t * 1e6:.3g} us); raise a budget or max_cells_2d")
        picks = pk
    if picks is None:  # a 1-D coarse grid lost the cheapest plan to rounding
        raise ValueError("target_params / target_latency: budget too tight for the solver's grid; raise it or max_cells")
    if not grid_exact:
        picks = _improve(P, T, S, picks, inf_p, inf_t)
    rows = []
    for c, j in zip(candidates, picks):
        ch = c.choices[j]
        rows.append(PlanEntry(c.name, ch.method, ch.rank, ch.params, ch.score, c.in_features, c.out_features,
                              seconds=ch.seconds, nblocks=ch.nblocks))
    score = sum(r.score for r in rows)
    exact = grid_exact or score <= lower + 1e-12 * max(1.0, abs(score))
    plan = BudgetPlan(budget=bp, target_params_dense=total, exact=exact, modules=rows,
                      score_lower_bound=score if grid_exact else max(lower, 0.0) if math.isfinite(lower) else None,
                      latency=lat)
    if bp is not None:
        assert plan.params <= bp, (plan.params, bp)
    if bt is not None:
        assert plan.seconds <= bt * (1 + 1e-12), (plan.seconds, bt)
    return plan


def _as_latency(latency):
    from .plan_latency import LatencyModel, latency_model

    if latency is None:
        return latency_model()
    if isinstance(latency, LatencyModel):
        return latency
    if isinstance(latency, dict):
        return latency_model(**latency)
    raise TypeError(f"latency: expected a LatencyModel or a dict of latency_model() arguments "
                    f"(device, tokens, direction, dtype, bench), got {type(latency).__name__}")


def check_budgets(candidates: List[ModuleCandidates], target_params=None, target_latency=None,
                  latency_info: Optional[dict] = None) -> None:
    """Every budget error :func:`solve` would raise, from the candidates' parameters and times
    alone (no score needed, so before any weight is read): bad values, each budget unreachable,
    and both together unreachable (the least time within the parameter budget, by the same DP)."""
    if target_params is None and target_latency is None:
        raise ValueError("target_params / target_latency: expected at least one budget, got neither")
    zero = [ModuleCandidates(c.name, c.in_features, c.out_features,
                             [Choice(ch.method, ch.rank, ch.params, 0.0, ch.seconds, ch.nblocks) for ch in c.choices])
            for c in candidates]
    total = sum(c.dense_params for c in zero)
    bp = None
    if target_params is not None:
        bp = resolve_budget(target_params, total, sum(min(ch.params for ch in c.choices) for c in zero))
    if target_latency is not None:
        timed = [ModuleCandidates(c.name, c.in_features, c.out_features,
                                  [Choice(ch.method, ch.rank, ch.params, ch.seconds, ch.seconds, ch.nblocks)
                                   for ch in c.choices]) for c in candidates]
        if any(ch.seconds is None for c in timed for ch in c.choices):
            raise ValueError("target_latency: some choices have no time (pass latency= to the planner)")
        solve(zero, None, target_latency, latency_info=latency_info)  # value and reachability
        if bp is not None:
            fastest = solve(timed, bp)  # least time within the parameter budget
            bt = resolve_latency(target_latency, sum(next(ch.seconds for ch in c.choices if ch.method == "dense")
                                                     for c in timed))
            if fastest.exact and fastest.score > bt * (1 + 1e-12):
                raise ValueError(
                    f"target_params and target_latency: unreachable together: within {bp:,} parameters the "
                    f"fastest candidate plan takes {fastest.score * 1e6:.4g} us > {bt * 1e6:.4g} us")


LATENCY_SCOPES = ("targets", "model")


def whole_model_latency(model: nn.Module, candidates: List[ModuleCandidates], latency, seq_len=None) -> dict:
    """The whole model's predicted time around the targets (shapes only): ``other_linears_s`` (every
    linear layer that is not a target, kept dense), the rest (attention core, norms, activations,
    residual adds, embeddings: :func:`fastfactor.plan_latency.rest_seconds`, a stated model),
    ``fixed_s`` (their sum: what no plan changes), ``targets_dense_s`` and ``model_dense_s``."""
    from .plan_latency import linear_specs, rest_seconds

    specs = linear_specs(model)
    names = {c.name for c in candidates}
    other = {n: sp for n, sp in specs.items() if n not in names}
    secs = latency.costs(list(other.values())) if other else []
    if any(t is None for t in secs):
        raise ValueError("latency: some non-target linear layers have no time under this latency source")
    rest = rest_seconds(model, latency, seq_len)
    rest.pop("model")
    targets_dense = sum(next(ch.seconds for ch in c.choices if ch.method == "dense") for c in candidates)
    other_s = float(sum(secs))
    fixed = other_s + rest["rest_s"]
    return dict(rest, other_linears=len(other), other_linears_s=other_s, fixed_s=fixed,
                targets_dense_s=targets_dense, model_dense_s=fixed + targets_dense)


def scoped_latency(target_latency, scope: str, whole: Optional[dict], candidates: List[ModuleCandidates]):
    """``target_latency`` as the fraction of the *targets'* dense time the solver takes.

    ``scope="targets"``: unchanged. ``scope="model"``: ``target_latency`` is a fraction ``f`` of the
    whole model's predicted dense time ``T``; the rest of the model (``whole['fixed_s']``: other
    linears, attention, elementwise, embeddings) takes ``F`` whatever the plan, so the targets get
    ``f·T − F``: the fraction ``(f·T − F) / T_targets`` (at most 1). Unreachable (the rest plus the
    fastest plan of the targets above ``f·T``) raises, naming each part."""
    if scope not in LATENCY_SCOPES:
        raise ValueError(f"latency_scope: expected one of {list(LATENCY_SCOPES)}, got {scope!r}")
    if target_latency is None or scope == "targets":
        return target_latency
    resolve_latency(target_latency)
    f = float(target_latency)
    budget = f * whole["model_dense_s"]
    fastest = sum(min(ch.seconds for ch in c.choices) for c in candidates)
    if whole["fixed_s"] + fastest > budget * (1 + 1e-12):
        raise ValueError(
            f"target_latency: budget {f:g} x the whole model's {whole['model_dense_s'] * 1e6:.4g} us = "
            f"{budget * 1e6:.4g} us is unreachable: the rest of the model takes {whole['fixed_s'] * 1e6:.4g} us "
            f"(attention {whole['attention_s'] * 1e6:.4g}, elementwise {whole['elementwise_s'] * 1e6:.4g}, "
            f"embeddings {whole['embeddings_s'] * 1e6:.4g}, {whole['other_linears']} other linear(s) "
            f"{whole['other_linears_s'] * 1e6:.4g}) and the fastest plan of the targets {fastest * 1e6:.4g} us: "
            f"at least {(whole['fixed_s'] + fastest) / whole['model_dense_s']:.3f} of the whole model "
            f"({PREDICTED}, seq_len {whole['seq_len']})")
    return min(1.0, (budget - whole["fixed_s"]) / whole["targets_dense_s"])


SCORERS = ("svd", "whitened", "output")


def calibration_batches(data, config=None) -> list:
    """The calibration batches a :func:`fastfactor.compress` run with ``config`` draws first from
    ``data`` (a :class:`~fastfactor.train.TaskData`): ``calib_batches`` batches of ``batch_size``
    training rows, shuffled with ``seed + 7`` (the driver's order), so a plan is scored on the
    tokens the run itself calibrates on."""
    from .api import _config
    from .train.data import TaskData, iterate

    if not isinstance(data, TaskData):
        raise TypeError(f"data: expected a fastfactor.train.TaskData, got {type(data).__name__}")
    cfg = _config(config)
    n = max(1, cfg.calib_batches)
    it = iterate(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7)
    return [b for _, b in zip(range(n), it)]


def calibration_grams(model: nn.Module, names: Sequence[str], batches: Sequence, device=None) -> Dict[str, tuple]:
    """``{name: (G, tokens)}``: the input Gram ``XᵀX`` (float64, ``(in, in)``) of each module
    ``names`` of ``model`` over ``batches`` (dicts of model inputs), as the driver collects them."""
    from .compress.calibration import collect_activation_stats
    from .compress.targets import get_module
    from .train.loop import model_inputs

    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    mods = {n: get_module(model, n) for n in names}
    return collect_activation_stats(model, mods, batches, lambda m, b: m(**model_inputs(m, b, device)))


def _data_forward(device):
    from .train.loop import model_inputs

    def forward(m, b):
        out = m(**model_inputs(m, b, device))
        for k in ("logits", "last_hidden_state"):
            if hasattr(out, k):
                return getattr(out, k)
        return out[0] if isinstance(out, (tuple, list)) else out
    return forward


def _calibration_record(data, config, batches, scorer: str) -> dict:
    import hashlib

    from .api import _config

    cfg = _config(config)
    h = hashlib.sha256()
    for b in batches:
        _batch_digest(h, {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
                 for b in batches)
    return {"data": getattr(data, "name", "data"), "batches": len(batches), "batch_size": cfg.batch_size,
            "seed": cfg.seed, "tokens": tokens, "scorer": scorer, "digest": h.hexdigest()[:16]}


def plan_model(model: nn.Module, target_params=None, config=None, *, target_latency=None, latency=None,
               grams=None, ratios=DEFAULT_RATIOS, ranks=None, methods: Sequence[str] = ("lowrank",),
               max_cells: int = MAX_CELLS, cache=True, batches=None, forward=None, data=None,
               scorer: Optional[str] = None, latency_scope: str = "targets", seq_len: Optional[int] = None,
               **grid) -> BudgetPlan:
    """:func:`candidate_grid`, the budgets checked (:func:`check_budgets`) before any weight is
    read, then :func:`score_candidates` (or :func:`output_scores`) and :func:`solve`.

    ``target_params``: a fraction of the targets' weight parameters or a count; ``target_latency``:
    a fraction in ``(0, 1]`` of the targets' dense time under ``latency`` (a
    :class:`~fastfactor.plan_latency.LatencyModel`, or a dict of
    :func:`~fastfactor.plan_latency.latency_model` arguments: ``device``, ``tokens``, ``direction``,
    ``dtype``, ``bench``; default the ``sol`` model on an H200 at 16384 tokens, forward). Either
    budget or both. ``methods``: the families in the grid besides "dense" (default low-rank only).

    The scores (``scorer``): ``"svd"`` (no data: tail energies of the weights), ``"whitened"``
    (activation-weighted errors from the Grams ``grams``, or from ``data``), ``"output"`` (the
    change of the model's output over calibration batches: :func:`output_scores`).
    ``data`` (a :class:`~fastfactor.train.TaskData`): the calibration batches are those a
    ``compress`` run with ``config`` draws (:func:`calibration_batches`: ``calib_batches``,
    ``batch_size``, ``seed``), the Grams are measured on them (default scorer ``"whitened"``), and
    the plan records them (``plan.calibration``: data name, batches, tokens, a digest). ``batches``
    (with an optional ``forward``): score by the output change over these batches instead.
    Scores are cached on disk (``cache``) under keys that include the calibration data (the Grams'
    contents; for output scores the batches and the whole model).

    ``latency_scope``: ``"targets"`` (``target_latency`` is a fraction of the targets' dense time)
    or ``"model"`` (a fraction of the whole model's predicted time: every linear, the attention
    core, norms, activations and embeddings under the stated model of
    :func:`fastfactor.plan_latency.rest_seconds`, at ``seq_len`` keys per query; the sol model
    only). With the sol model the plan reports the whole-model fraction either way
    (``plan.model_latency_fraction``)."""
    from .api import _chosen_targets, _config

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if scorer is not None and scorer not in SCORERS:
        raise ValueError(f"scorer: expected one of {list(SCORERS)}, got {scorer!r}")
    if scorer is None:
        scorer = "output" if batches is not None else "whitened" if (grams is not None or data is not None) else "svd"
    if scorer == "output" and batches is None and data is None:
        raise ValueError("scorer: 'output' needs calibration data (data= or batches=), got neither")
    if scorer == "whitened" and grams is None and data is None:
        raise ValueError("scorer: 'whitened' needs activation Grams (grams=) or calibration data (data=), got neither")
    if data is not None and batches is not None:
        raise ValueError("data / batches: expected one source of calibration batches, got both")
    if target_params is None and target_latency is None:
        raise ValueError("target_params / target_latency: expected at least one budget, got neither")
    if target_latency is not None:  # the value alone, before any time is computed
        resolve_latency(target_latency)
    if latency_scope not in LATENCY_SCOPES:
        raise ValueError(f"latency_scope: expected one of {list(LATENCY_SCOPES)}, got {latency_scope!r}")
    cfg = _config(config)
    targets = _chosen_targets(model, cfg, None)
    lat = _as_latency(latency) if (target_latency is not None or latency is not None) else None
    cands = candidate_grid(model, targets, ratios=ratios, ranks=ranks, methods=methods, latency=lat, **grid)
    info = lat.describe() if lat is not None else None
    whole = _whole_or_none(model, cands, lat, latency_scope, seq_len)
    asked = target_latency
    target_latency = scoped_latency(target_latency, latency_scope, whole, cands)
    check_budgets(cands, target_params, target_latency, info)  # before any weight is touched
    calib = None
    if data is not None:
        batches = calibration_batches(data, cfg)
        calib = _calibration_record(data, cfg, batches, scorer)
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        if grams is None and scorer != "svd":
            grams = calibration_grams(model, [t.name for t in targets], batches, dev)
        if forward is None:
            forward = _data_forward(dev)
    if scorer == "output":
        output_scores(model, cands, batches, forward, grams, cache=cache)
    else:
        score_candidates(model, cands, grams if scorer == "whitened" else None, cache=cache)
    plan = solve(cands, target_params, target_latency, max_cells=max_cells, latency_info=info)
    whitened = grams is not None and scorer != "svd"
    plan.scorer, plan.init = scorer, "activation" if whitened else "svd"
    plan.calibration = calib
    for m in plan.modules:
        if m.method != "dense":
            m.init = score_init(m.method, whitened)
    finish_latency(plan, cands, info, whole, latency_scope, asked)
    return plan


def _whole_or_none(model, cands, lat, scope: str, seq_len):
    """:func:`whole_model_latency` with the sol model (a bench file: only for ``scope="model"``,
    where it raises); None without a latency model."""
    from .plan_latency import SolLatency

    if lat is None:
        if scope == "model":
            raise ValueError("latency_scope: 'model' needs a latency model (latency=), got none")
        return None
    if scope == "model":
        return whole_model_latency(model, cands, lat, seq_len)
    if isinstance(lat, SolLatency) or hasattr(getattr(lat, "device", None), "hbm_bw"):
        try:
            return whole_model_latency(model, cands, lat, seq_len)
        except ValueError:  # no transformer config (a plain module): the targets' time only
            if seq_len is not None:
                raise
            return None
    return None


def finish_latency(plan: BudgetPlan, cands, info, whole, scope: str, asked) -> None:
    """The plan's latency record: the targets' budget and dense time (a parameter budget: no
    budget, the time still reported), the scope, and with ``whole`` the whole model's parts."""
    if info is None:
        return
    if plan.latency is None:
        dense_s = sum(next(ch.seconds for ch in c.choices if ch.method == "dense") for c in cands)
        plan.latency = dict(info, fraction=None, budget_s=None, dense_s=dense_s)
    plan.latency["scope"] = scope
    if whole is not None:
        plan.latency["whole_model"] = {k: v for k, v in whole.items()}
        plan.latency["rest_model"] = _rest_model_text()
    if scope == "model":
        plan.latency["fraction_model"] = float(asked)
        plan.latency["budget_model_s"] = float(asked) * whole["model_dense_s"]


def _rest_model_text() -> str:
    from .plan_latency import REST_MODEL

    return REST_MODEL


def apply_plan(model: nn.Module, plan: BudgetPlan, data=None, config=None) -> nn.Module:
    """Execute ``plan`` on ``model`` in place: ``factorize_`` (data-free inits) or, with ``data``,
    one ``fastfactor.compress`` run with ``config``'s schedule (staged / offline / all_at_once);
    returns the model. Every planned module must be a target of the model with the planned shape.
    Without data a plan mixing methods runs one ``factorize_`` per method; with data one run
    factorizes each module with its own method (:meth:`BudgetPlan.run_config`)."""
    from .api import factorize_

    from .plan_data import fit_names

    plan = fit_names(model, as_plan(plan))
    check_plan(model, plan)
    cfgs = plan.to_configs(config)
    if not cfgs:
        return model
    if data is None:
        for cfg in cfgs:  # one factorize_ per method: disjoint module sets
            factorize_(model, cfg)
        return model
    from .compress.driver import compress

    compress(model, config, data, plan=plan)
    return model


__all__ = ["Choice", "ModuleCandidates", "PlanEntry", "BudgetPlan", "PLAN_METHODS", "PLAN_VERSION", "candidate_ranks", "tail_energies",
           "candidate_grid", "score_candidates", "output_scores", "ScoreCache", "sensitivity", "resolve_budget", "resolve_latency",
           "check_budgets", "solve", "plan_model", "as_plan", "check_plan", "apply_plan", "calibration_batches",
           "calibration_grams", "output_cache_key", "SCORERS", "LATENCY_SCOPES", "whole_model_latency",
           "scoped_latency"]
