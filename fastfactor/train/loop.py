"""Fine-tuning and distillation loops, and evaluation.

Objectives
----------
* **task**: cross-entropy on class logits (classification) or MSE on a scalar score
  (regression), the labels from :class:`~fastfactor.train.data.TaskData`;
* **distill** from a frozen copy of the uncompressed model (the teacher) on unlabelled text:
  ``mse`` between the last hidden states over real (non-padding) tokens, or ``kl`` =
  ``KL(softmax(teacher/T) ‖ softmax(student/T))·T²`` on logits (over real tokens for per-token
  logits). ``auto`` picks ``kl`` when the model returns logits, ``mse`` otherwise.
* **task+distill**: both, weighted (labelled data, a model that returns logits)::

      L = w_task · L_task(labels) + w_kd · L_distill(T) + w_hid · L_hidden

  ``L_hidden`` = mean over real tokens of ``mean_d (h_s − h_t)²`` on the last hidden states
  (``output_hidden_states``), only computed when ``w_hid > 0``. The same weights apply to the
  terms ``distill`` uses (``w_kd·L_distill + w_hid·L_hidden``); ``task`` is ``w_task·L_task``.
  A weight of exactly 1 leaves a term bitwise as it was before weights existed.

Evaluation
----------
A labelled task reports its metrics (GLUE's: accuracy, F1, Matthews correlation, Pearson /
Spearman). Distillation reports fidelity to the teacher on the eval split: for hidden states,
mean cosine similarity of mean-pooled embeddings (sentence-transformers' pooling) and the
Spearman correlation of their pairwise similarities; for logits, the top-1 agreement and the KL.

The loop: AdamW, linear warm-up then linear (or cosine, or constant) decay, gradient-norm clipping,
bf16 autocast on CUDA (on CPU only when ``FASTFACTOR_CPU_AUTOCAST`` asks for it), NVTX ranges
(``fastfactor.profiling``) around forward, backward and the optimizer step.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from .. import profiling
from . import metrics as M
from .data import Batch, TaskData, iterate, select

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(model: nn.Module, batch: Batch, device) -> Dict[str, torch.Tensor]:
    """The batch's model inputs on ``device`` (``token_type_ids`` only if the model takes them)."""
    out = {}
    for k in _MODEL_KEYS:
        if k in batch:
            if k == "token_type_ids" and not _accepts_token_types(D.unwrap(model)):
                continue
            out[k] = batch[k].to(device)
    return out


def _accepts_token_types(model: nn.Module) -> bool:
    import inspect

    try:
        return "token_type_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def output_kind(out) -> str:
    """``logits`` when the model returns logits, else ``hidden``."""
    return "logits" if getattr(out, "logits", None) is not None else "hidden"


def output_tensor(out) -> torch.Tensor:
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model output: expected logits or last_hidden_state, got {type(out).__name__}")


def mean_pool(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Average of the token vectors over real tokens (sentence-transformers' mean pooling)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per-token values ``x (B, T)`` over real tokens."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


#: ``FASTFACTOR_CPU_AUTOCAST=bf16`` (or ``bfloat16``, ``fp16``/``float16``) runs the CPU forward
#: passes of fine-tuning and evaluation under ``torch.autocast("cpu", dtype=...)``, as CUDA always
#: runs them under bf16 autocast: how the CPU tests exercise the GPU path's mixed precision.
CPU_AUTOCAST_ENV = "FASTFACTOR_CPU_AUTOCAST"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16}


def cpu_autocast_dtype() -> Optional[torch.dtype]:
    """The dtype ``FASTFACTOR_CPU_AUTOCAST`` asks for on CPU, or None (unset, empty, ``0``, ``off``)."""
    val = os.environ.get(CPU_AUTOCAST_ENV, "").strip().lower()
    if val in ("", "0", "off", "no", "false", "none"):
        return None
    if val not in _AUTOCAST_DTYPES:
        raise ValueError(f"{CPU_AUTOCAST_ENV}: expected one of {sorted(_AUTOCAST_DTYPES)} or 0, got {val!r}")
    return _AUTOCAST_DTYPES[val]


def _autocast(device):
    """bf16 autocast on CUDA; on CPU off unless ``FASTFACTOR_CPU_AUTOCAST`` asks for it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    dt = cpu_autocast_dtype() if dev.type == "cpu" else None
    if dt is not None:
        return torch.autocast("cpu", dtype=dt)
    return torch.autocast("cpu", enabled=False)


OBJECTIVES = ("task", "distill", "task+distill")

#: what ``objective="auto"`` resolves to: labelled data → AUTO_LABELLED, else distillation. Kept
#: ``task``: on the README's labelled evidence task+distill was not distinguishable from it (within
#: ±1 point over 12 paired cells, seed-to-seed spread up to 6) and costs a teacher copy and its
#: forward pass per step (README, "Evidence: objective and the equal-training dense reference")
AUTO_LABELLED = "task"


def check_weights(kind: str, task_weight: float = 1.0, distill_weight: float = 1.0, hidden_weight: float = 0.0,
                  temperature: float = 2.0) -> None:
    """Loss weights: finite and ``>= 0``, the ones ``kind`` uses not all zero; temperature
    finite and ``> 0``. ``kind`` may be ``auto`` (then only the weights themselves are checked,
    plus "not all three zero"). Raises ``ValueError`` / ``TypeError`` naming the weight."""
    vals = {"task_weight": task_weight, "distill_weight": distill_weight, "hidden_weight": hidden_weight,
            "temperature": temperature}
    for name, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a finite number >= 0, got {type(v).__name__} {v!r}")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {v}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    used = {"task": ("task_weight",), "distill": ("distill_weight", "hidden_weight"),
            "task+distill": ("task_weight", "distill_weight", "hidden_weight")}.get(
        kind, ("task_weight", "distill_weight", "hidden_weight"))
    if all(vals[n] == 0 for n in used):
        raise ValueError(
            f"{'/'.join(used)}: objective {kind!r} needs at least one of these loss weights > 0, "
            f"got {', '.join(f'{n}={vals[n]}' for n in used)}"
        )


@dataclass
class Objective:
    """What a fine-tuning step minimizes; ``teacher`` is set when a distillation term is used.

    ``loss = task_weight·L_task + distill_weight·L_distill + hidden_weight·L_hidden``, each
    term only where ``kind`` uses it (see the module docstring)."""

    kind: str  #: task | distill | task+distill
    task_type: str = "unlabelled"
    distill_loss: str = "auto"
    temperature: float = 2.0
    teacher: Optional[nn.Module] = None
    device: str = "cpu"
    task_weight: float = 1.0
    distill_weight: float = 1.0
    hidden_weight: float = 0.0

    @classmethod
    def build(cls, model: nn.Module, data: TaskData, objective: str = "auto", distill_loss: str = "auto",
              device="cpu", teacher: Optional[nn.Module] = None, *, task_weight: float = 1.0,
              distill_weight: float = 1.0, hidden_weight: float = 0.0, temperature: float = 2.0) -> "Objective":
        """``objective='auto'``: :data:`AUTO_LABELLED` when the data are labelled, else
        distillation. The teacher (any distillation term) is a frozen deep copy of ``model``
        taken now, unless given. Weights are checked (:func:`check_weights`) before anything."""
        if objective != "auto" and objective not in OBJECTIVES:
            raise ValueError(f"objective: expected 'auto' or one of {list(OBJECTIVES)}, got {objective!r}")
        if objective == "auto":
            objective = AUTO_LABELLED if data.labelled else "distill"
        if objective in ("task", "task+distill") and not data.labelled:
            raise ValueError(f"objective: {objective!r} needs labelled data; the data given have no labels (use distill)")
        check_weights(objective, task_weight, distill_weight, hidden_weight, temperature)
        obj = cls(objective, data.task_type, distill_loss, float(temperature), device=str(device),
                  task_weight=float(task_weight), distill_weight=float(distill_weight),
                  hidden_weight=float(hidden_weight))
        if objective != "task":
            if teacher is None:
                teacher = copy.deepcopy(model)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            obj.teacher = teacher
        return obj

    # ---------------------------------------------------------------------------------------
    def terms(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        """The unweighted loss terms this objective uses: ``task``, ``distill``, ``hidden``."""
        inputs = model_inputs(model, batch, self.device)
        hidden = self.kind != "task" and self.hidden_weight > 0
        kw = {"output_hidden_states": True} if hidden else {}
        out = model(**inputs, **kw)
        terms = {}
        if self.kind != "distill":
            terms["task"] = task_loss(out, batch["labels"].to(self.device), self.task_type)
        if self.kind != "task":
            with torch.no_grad():
                t_out = self.teacher(**inputs, **kw)
            mask = inputs.get("attention_mask")
            if self.distill_weight > 0:
                terms["distill"] = distill_loss(out, t_out, mask, self.distill_loss, self.temperature)
            if hidden:
                terms["hidden"] = hidden_state_loss(out, t_out, mask)
        return terms

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        terms = self.terms(model, batch)
        w = {"task": self.task_weight, "distill": self.distill_weight, "hidden": self.hidden_weight}
        total = None
        for name, value in terms.items():
            value = value if w[name] == 1.0 else w[name] * value
            total = value if total is None else total + value
        return total

    def calibration_loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """A loss whose gradients measure parameter importance (Fisher information).

        Task and task+distill: the task loss (empirical Fisher). Distillation: at the start the student equals
        the teacher and the distillation loss has zero gradient, so we use the Fisher of a unit
        Gaussian (hidden states) or categorical (logits) output model, sampled: targets drawn from
        the model's own predictive distribution (``h + ε`` or a label sampled from the softmax).
        """
        inputs = model_inputs(model, batch, self.device)
        out = model(**inputs)
        if self.kind != "distill":  # task and task+distill: the empirical Fisher of the labels
            return task_loss(out, batch["labels"].to(self.device), self.task_type)
        y = output_tensor(out).float()
        mask = inputs.get("attention_mask")
        if output_kind(out) == "logits":
            probs = y.detach().softmax(-1).reshape(-1, y.shape[-1])
            sample = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(y.shape[:-1]).to(y.device)
            nll = F.cross_entropy(y.reshape(-1, y.shape[-1]), sample.reshape(-1), reduction="none").reshape(y.shape[:-1])
            return _masked_mean(nll, mask if nll.ndim == 2 else None)
        eps = torch.randn(y.shape, generator=generator).to(y.device)
        per_token = (0.5 * (y - (y.detach() + eps)) ** 2).sum(-1)
        return _masked_mean(per_token, mask)


def task_loss(out, labels: torch.Tensor, task_type: str) -> torch.Tensor:
    logits = output_tensor(out).float()
    if task_type == "regression":
        return F.mse_loss(logits.reshape(logits.shape[0], -1)[:, 0], labels.float())
    return F.cross_entropy(logits, labels.long())


def distill_loss(out, t_out, mask, kind: str = "auto", temperature: float = 2.0) -> torch.Tensor:
    if kind == "auto":
        kind = "kl" if output_kind(out) == "logits" else "mse"
    if kind == "kl":
        if output_kind(out) != "logits" or output_kind(t_out) != "logits":
            raise ValueError("distill_loss: 'kl' needs a model that returns logits; use 'mse'")
        s, t = out.logits.float() / temperature, t_out.logits.float() / temperature
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1) * temperature**2
        return _masked_mean(kl, mask if kl.ndim == 2 else None)
    hs = getattr(out, "last_hidden_state", None)
    ht = getattr(t_out, "last_hidden_state", None)
    if hs is None or ht is None:  # models with logits only: distil the logits by MSE
        hs, ht = output_tensor(out), output_tensor(t_out)
    per_token = ((hs.float() - ht.float()) ** 2).mean(-1)
    return _masked_mean(per_token, mask if per_token.ndim == 2 else None)


def last_hidden(out) -> torch.Tensor:
    """The last hidden states ``(B, T, d)`` of a model output (``last_hidden_state``, else the
    last of ``hidden_states``: call the model with ``output_hidden_states=True``)."""
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        hs = getattr(out, "hidden_states", None)
        if not hs:
            raise ValueError("hidden_weight: the model output has no hidden states "
                             "(it must accept output_hidden_states=True)")
        h = hs[-1]
    return h


def hidden_state_loss(out, t_out, mask) -> torch.Tensor:
    """``mean over real tokens of mean_d (h_student − h_teacher)²`` on the last hidden states."""
    hs, ht = last_hidden(out).float(), last_hidden(t_out).float()
    per_token = ((hs - ht) ** 2).mean(-1)
    return _masked_mean(per_token, mask if per_token.ndim == 2 else None)


PARALLEL = ("auto", "ddp", "fsdp")
DECAYS = ("linear", "cosine", "constant")


def lr_factor(step: int, steps: int, warmup_ratio: float = 0.1, decay: str = "linear") -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based) of ``steps``: linear
    warm-up over ``w = ceil(warmup_ratio·steps)`` steps (``(step+1)/w``), then ``decay``:
    ``linear`` ``(steps−step)/(steps−w)``, ``cosine`` ``½(1+cos(π·(step−w)/(steps−w)))`` or
    ``constant`` 1."""
    warm = int(math.ceil(warmup_ratio * steps))
    if step < warm:
        return (step + 1) / warm
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))
    return max(0.0, (steps - step) / max(1, steps - warm))


def finetune(
    model: nn.Module,
    objective: Objective,
    data: TaskData,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    decay: str = "linear",
    progress: bool = False,
    desc: str = "fine-tune",
    train_embeddings: bool = True,
    parallel: str = "auto",
    resume: Optional[dict] = None,
    on_step: Optional[Callable[[int, Callable[[], dict]], None]] = None,
) -> Dict[str, float]:
    """``steps`` optimizer steps of AdamW on ``objective``; returns the first/last/mean loss.
    ``train_embeddings=False`` keeps every ``nn.Embedding`` frozen. The learning rate is
    ``lr·lr_factor(step, steps, warmup_ratio, decay)`` (warm-up then ``linear`` / ``cosine`` /
    ``constant``; :func:`lr_factor`).

    Under ``torch.distributed`` (e.g. ``torchrun``) ``batch_size`` is the *global* batch: each rank
    reads its share (``fastfactor.distributed.iterate_sharded``; a last partial global batch of an
    epoch is skipped), the finite-loss check is all-reduced, the losses returned are means over
    ranks, and only rank 0 shows a progress bar. ``parallel`` picks the engine:

    * ``"ddp"`` (``"auto"``): ``DistributedDataParallel`` around ``model`` for these steps
      (gradients averaged over ranks by its bucketed all-reduce; ``find_unused_parameters`` on,
      since e.g. a pooler gets no gradient when distilling hidden states);
    * ``"fsdp"``: FSDP2 ``fully_shard`` on a sharded copy of ``model``
      (:func:`fastfactor.distributed.fsdp_copy`: parameters, gradients and AdamW moments split over
      ranks, units = the model's transformer blocks), trained, then written back into ``model``
      (if the fine-tune fails, ``model`` keeps its values from before it).

    Outside ``torch.distributed`` both mean a plain single-process loop.

    Checkpointing: ``on_step(done, snapshot)`` is called on every rank after each step, ``done``
    steps being finished; ``snapshot()`` (collective: all ranks call it or none) writes the trained
    values into ``model`` (under FSDP) and returns the loop's state: ``{"step", "steps", "losses",
    "optimizer"`` (:func:`fastfactor.distributed.full_optimizer_state`, keyed by parameter name),
    ``"scheduler"}``. ``resume=`` that dict continues the loop from it, with the model as it was at
    that point: optimizer moments, learning-rate schedule and the position in the (seeded) batch
    stream are restored, so with the RNG states restored too the result is bitwise that of an
    uninterrupted loop.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: expected one of {PARALLEL}, got {parallel!r}")
    if decay not in DECAYS:
        raise ValueError(f"decay: expected one of {DECAYS}, got {decay!r}")
    if steps <= 0:
        return {"steps": 0}
    start = 0
    if resume is not None:
        for key in ("step", "losses", "optimizer", "scheduler"):
            if key not in resume:
                raise ValueError(f"resume: expected a fine-tuning state with {key!r} (from snapshot()), got keys {sorted(resume)}")
        start = resume["step"]
        if resume.get("steps", steps) != steps or not 0 <= start <= steps or len(resume["losses"]) != start:
            raise ValueError(
                f"resume: a state at step {start} of {resume.get('steps')} with {len(resume['losses'])} losses "
                f"does not continue a fine-tune of {steps} steps"
            )
    frozen = set()
    if not train_embeddings:
        frozen = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    restore = [(p, p.requires_grad) for p in model.parameters() if id(p) in frozen]
    for p, _ in restore:
        p.requires_grad_(False)
    sharded = D.is_distributed()  # under torchrun: this rank's share of each global batch of batch_size
    engine = ("fsdp" if parallel == "fsdp" else "ddp") if sharded else "none"
    was_training = model.training
    model.train()
    inner = wrapper = model
    bar = None
    try:
        if engine == "fsdp":
            inner = wrapper = D.fsdp_copy(model, device=objective.device)
        elif engine == "ddp":
            wrapper = D.wrap_ddp(model, device=objective.device, find_unused_parameters=True)
        params = [p for p in inner.parameters() if p.requires_grad]
        with_wd = [p for p in params if p.ndim >= 2]
        no_wd = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": with_wd, "weight_decay": weight_decay}, {"params": no_wd, "weight_decay": 0.0}], lr=lr
        )
        def lr_lambda(step):
            return lr_factor(step, steps, warmup_ratio, decay)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        losses = []
        if resume is not None:
            D.load_full_optimizer_state(inner, opt, resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            losses = [float(v) for v in resume["losses"]]
        if sharded:
            batches = D.iterate_sharded(data.train, batch_size, shuffle=True, seed=seed, epochs_forever=True, start=start)
        else:
            batches = iterate(data.train, batch_size, shuffle=True, seed=seed, epochs_forever=True, start=start)

        def snapshot() -> dict:
            if engine == "fsdp":
                D.fsdp_copy_back(inner, model)
            return {"step": len(losses), "steps": steps, "losses": list(losses),
                    "optimizer": D.full_optimizer_state(inner, opt), "scheduler": sched.state_dict()}

        if progress and D.is_main_process():
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc=desc, leave=False)
        for _ in range(start, steps):
            batch = next(batches)
            with profiling.range("forward"), _autocast(objective.device):
                loss = objective.loss(wrapper, batch)
            if not D.all_finite(loss):  # all-reduced: every rank stops at the same step
                where = f" on some rank (this rank: {float(loss)})" if sharded else f" {float(loss)}"
                raise FloatingPointError(f"{desc}: the loss became{where} at step {len(losses)}")
            with profiling.range("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()  # DDP / FSDP average the gradients over ranks here
            with profiling.range("optimizer step"):
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
            losses.append(float(D.all_reduce_mean(loss.detach()) if sharded else loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if on_step is not None:
                on_step(len(losses), snapshot)
        if engine == "fsdp":
            D.fsdp_copy_back(inner, model)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        for p, flag in restore:
            p.requires_grad_(flag)
        del wrapper, inner
    return {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1], "loss_mean": sum(losses) / len(losses)}


@torch.no_grad()
def collect_outputs(model: nn.Module, batch: Batch, device, batch_size: int = 64, pool: bool = True):
    """Model outputs over a split: pooled embeddings ``(n, d)`` / sequence logits, or per-token
    logits with their mask. Returns ``(tensor, mask or None, kind)``."""
    was = model.training
    model.eval()
    outs, masks, kind = [], [], None
    try:
        for b in iterate(batch, batch_size):
            inputs = model_inputs(model, b, device)
            with _autocast(device):
                o = model(**inputs)
            kind = output_kind(o)
            y = output_tensor(o).float().cpu()
            mask = inputs.get("attention_mask")
            mask = mask.cpu() if mask is not None else None
            if kind == "hidden" and y.ndim == 3 and pool:
                outs.append(mean_pool(y, mask))
            elif y.ndim == 3:
                # per-token logits: keep real tokens only, flattened
                keep = mask.bool() if mask is not None else torch.ones(y.shape[:2], dtype=torch.bool)
                outs.append(y[keep])
            else:
                outs.append(y)
    finally:
        model.train(was)
    return torch.cat(outs), kind


def fidelity(student_out: torch.Tensor, teacher_out: torch.Tensor, kind: str) -> Dict[str, float]:
    if kind == "hidden":
        return {
            "cosine": M.mean_cosine(student_out, teacher_out),
            "pairwise_spearman": M.pairwise_similarity_spearman(student_out, teacher_out),
        }
    agree = float((student_out.argmax(-1) == teacher_out.argmax(-1)).double().mean())
    kl = float(
        (teacher_out.softmax(-1) * (teacher_out.log_softmax(-1) - student_out.log_softmax(-1))).sum(-1).mean()
    )
    return {"agreement": agree, "kl": kl}


class Evaluator:
    """Evaluates a model on ``data.eval``: the task's metrics, or fidelity to a reference model
    (whose outputs are computed once, at construction)."""

    def __init__(self, data: TaskData, device="cpu", reference: Optional[nn.Module] = None,
                 use_task: Optional[bool] = None, batch_size: int = 64):
        self.data, self.device, self.batch_size = data, device, batch_size
        self.use_task = data.labelled if use_task is None else use_task
        self.ref_out = None
        if not self.use_task:
            if reference is None:
                raise ValueError("reference: fidelity evaluation needs the uncompressed model")
            self.ref_out, self.kind = collect_outputs(reference, data.eval, device, batch_size)

    @property
    def primary(self) -> str:
        if self.use_task:
            if self.data.metric_names:
                return self.data.metric_names[0]
            return "pearson" if self.data.task_type == "regression" else (
                "f1" if self.data.num_labels == 2 else "accuracy")
        return "cosine" if self.kind == "hidden" else "agreement"

    def __call__(self, model: nn.Module) -> Dict[str, float]:
        with profiling.range("evaluate"):
            out, kind = collect_outputs(model, self.data.eval, self.device, self.batch_size)
            if self.use_task:
                names = tuple(self.data.metric_names) or None
                return M.task_metrics(self.data.task_type, out, self.data.eval["labels"], names)
            return fidelity(out, self.ref_out, kind)


__all__ = [
    "Objective", "OBJECTIVES", "check_weights", "hidden_state_loss", "lr_factor", "DECAYS", "finetune", "Evaluator", "fidelity", "collect_outputs", "mean_pool", "task_loss",
    "distill_loss", "model_inputs", "select",
]
