"""What a compression run reports: :class:`StageRecord` per stage, :class:`CompressionReport` for the
run, their JSON form, and the tables and log lines printed from them.

The driver (:mod:`fastfactor.compress.driver`) fills a report; the checkpoint writer
(:mod:`fastfactor.compress.resume`) stores it as JSON (:meth:`CompressionReport.to_json`) and reads
it back (:meth:`CompressionReport.from_json`); the command line prints :meth:`~CompressionReport.stage_table`
and :meth:`~CompressionReport.summary_table` (with a dense reference, its rows come from
:mod:`fastfactor.compress.reference`). It imports nothing of the driver or the checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence


@dataclass
class StageRecord:
    stage: int
    name: str
    modules: List[str]
    params: int  #: model parameters after this stage
    target_ratio: float  #: weight parameters kept so far over all targets (uncompressed counted as 1)
    metrics_offline: Dict[str, float] = field(default_factory=dict)  #: right after the swap
    metrics: Dict[str, float] = field(default_factory=dict)  #: after this stage's fine-tuning
    train: Dict[str, float] = field(default_factory=dict)
    init_info: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def log_line(self, primary_metric: Optional[str]) -> str:
        """One line for the run's log: modules, weights kept, the metric before/after fine-tuning, time."""
        pm = primary_metric
        return (
            f"stage {self.stage} ({self.name}): {len(self.modules)} module(s), kept {self.target_ratio:.3f}"
            + (f", {pm} {fmt_value(self.metrics_offline.get(pm))} → {fmt_value(self.metrics.get(pm))}" if pm else "")
            + f", {self.seconds:.1f}s"
        )


@dataclass
class CompressionReport:
    config: dict
    targets: List[dict]
    params_before: int
    params_after: int = 0
    target_weight_params_before: int = 0
    target_weight_params_after: int = 0
    primary_metric: Optional[str] = None
    metrics_before: Dict[str, float] = field(default_factory=dict)
    metrics_offline: Dict[str, float] = field(default_factory=dict)  #: every target swapped, before any fine-tuning
    metrics_after: Dict[str, float] = field(default_factory=dict)
    stages: List[StageRecord] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    #: ``dense_reference=True``: the uncompressed model fine-tuned the same way (:mod:`.reference`)
    dense_reference: Dict = field(default_factory=dict)
    #: ``joint``: the groups of modules compressed together (``{kind, parent, names}``, leader first)
    joint_groups: List[dict] = field(default_factory=list)
    #: the executed budget plan (:meth:`fastfactor.plan.BudgetPlan.to_dict`), when the run followed one
    plan: Optional[Dict] = None

    @property
    def compression(self) -> float:
        """Parameters after over before (whole model, embeddings included)."""
        return self.params_after / max(1, self.params_before)

    @property
    def target_ratio(self) -> float:
        """Weight parameters kept over the replaced layers (what ``ratio`` asks for)."""
        return self.target_weight_params_after / max(1, self.target_weight_params_before)

    def to_dict(self) -> dict:
        """The fields plus the derived ``compression`` and ``target_ratio`` (``report.json``)."""
        d = asdict(self)
        d["compression"] = self.compression
        d["target_ratio"] = self.target_ratio
        if self.dense_reference:
            from .reference import points_lost

            d["points_lost"] = points_lost(self)
        return d

    def to_json(self) -> dict:
        """The fields only (what a checkpoint stores; :meth:`from_json` inverts it)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CompressionReport":
        """The report stored by :meth:`to_json` (or :meth:`to_dict`: derived entries are dropped).
        Raises ``TypeError`` when the entries do not match this version's fields."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a dict of report fields, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k not in ("compression", "target_ratio", "points_lost")}
        d["stages"] = [StageRecord(**s) for s in d.get("stages", [])]
        return cls(**d)

    def stage_table(self) -> str:
        rows = []
        pm = self.primary_metric
        for s in self.stages:
            rows.append([
                s.stage, s.name, len(s.modules), f"{s.params:,}", f"{s.target_ratio:.3f}",
                fmt_value(s.metrics_offline.get(pm)) if pm else "-", fmt_value(s.metrics.get(pm)) if pm else "-",
                fmt_value(s.train.get("loss_last")), f"{s.seconds:.1f}",
            ])
        head = ["stage", "name", "modules", "params", "kept", f"{pm} swapped", f"{pm} tuned", "loss", "s"]
        return format_table(head, rows)

    def summary_table(self) -> str:
        pm = self.primary_metric
        rows = [
            ["parameters", f"{self.params_before:,}", f"{self.params_after:,}"],
            ["target weight parameters", f"{self.target_weight_params_before:,}", f"{self.target_weight_params_after:,}"],
            ["compression (whole model)", "1.000", f"{self.compression:.3f}"],
            ["kept (replaced layers)", "1.000", f"{self.target_ratio:.3f}"],
        ]
        if pm:
            # metrics_offline: right after the last swap, before the fine-tune that follows it
            rows.append([f"{pm} (after the last swap, before fine-tuning)", fmt_value(self.metrics_before.get(pm)),
                         fmt_value(self.metrics_offline.get(pm))])
            rows.append([f"{pm} (final)", fmt_value(self.metrics_before.get(pm)), fmt_value(self.metrics_after.get(pm))])
            if self.dense_reference:
                from .reference import summary_rows

                rows += summary_rows(self, fmt_value)
        rows.append(["time (s)", "", f"{self.seconds:.1f}"])
        return format_table(["", "before", "after"], rows)


def fmt_value(v) -> str:
    """A metric for a table: ``-`` when absent, 4 decimals for floats."""
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_table(headers: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub-markdown table (``tabulate`` when installed, a plain fallback otherwise)."""
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    except ImportError:  # pragma: no cover
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
        return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


_fmt = fmt_value  # the old private name

__all__ = ["StageRecord", "CompressionReport", "format_table", "fmt_value"]
