"""Evaluation report: ``report.json`` (all metrics), ``report.md`` (the paper-style table, the
GRPO step kept and why) and ``report.png`` (curves and pass@1 against tokens, embedded in it).

``report.json`` layout::

    {"evaluations": [{"model": "base", "token_budget": 512, "pass@1": 0.41,
                      "pass@1_ci95": [0.36, 0.46], "mean_output_tokens": 123.4,
                      "p50_output_tokens": ..., "p90_output_tokens": ..., "tokens_per_correct": ...,
                      "n_problems": 200, "n_samples": 4, "maj@4": ..., "truncated_share": ..., ...}, ...],
     "meta": {...}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmath_nemo.checkpoint.atomic import atomic_write_json, atomic_write_text

_ROW_KEYS = ("model", "token_budget")


@dataclass
class EvalRow:
    """Metrics of one model (``base``/``sft``/``grpo`` or any name) at one token budget.

    ``metrics`` is typically :func:`fastmath_nemo.evaluation.metrics.summarize`'s output and
    must contain ``pass@1`` and ``mean_output_tokens`` for the table.
    """

    model: str
    token_budget: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = [k for k in _ROW_KEYS if k in self.metrics]
        if clash:
            raise ValueError(f"metric names clash with row keys: {clash}")

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object stored under ``evaluations``."""
        return {"model": self.model, "token_budget": self.token_budget, **self.metrics}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "EvalRow":
        metrics = {k: v for k, v in row.items() if k not in _ROW_KEYS}
        return cls(model=str(row["model"]), token_budget=int(row["token_budget"]), metrics=metrics)


RowLike = EvalRow | Mapping[str, Any]


def _as_rows(rows: Sequence[RowLike]) -> list[EvalRow]:
    return [r if isinstance(r, EvalRow) else EvalRow.from_dict(r) for r in rows]


def _index(rows: list[EvalRow]) -> tuple[list[str], list[int], dict[tuple[str, int], EvalRow]]:
    """Models in first-seen order (the comparison order), budgets ascending, and a lookup."""
    models: list[str] = []
    cells: dict[tuple[str, int], EvalRow] = {}
    for row in rows:
        key = (row.model, row.token_budget)
        if key in cells:
            raise ValueError(f"duplicate evaluation for model={row.model!r} @ {row.token_budget}")
        cells[key] = row
        if row.model not in models:
            models.append(row.model)
    budgets = sorted({row.token_budget for row in rows})
    return models, budgets, cells


def _fmt_pass(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _fmt_tokens(value: float) -> str:
    return f"{value:,.0f}"


def format_comparisons(rows: Sequence[RowLike]) -> list[str]:
    """One line per (model, budget) comparing each model with the model listed before it,
    e.g. ``grpo vs sft @512: tokens -34.2%, pass@1 -0.5 pts``. A row label ``<model>|<variant>``
    (``grpo|think 100``: evaluation.prompted_budgets) is compared with the previous model's
    row of the same variant."""
    models, budgets, cells = _index(_as_rows(rows))
    variants: dict[str, list[str]] = {}
    for model in models:
        variants.setdefault(model.partition("|")[2], []).append(model)
    pairs = [pair for labels in variants.values() for pair in zip(labels, labels[1:])]
    lines: list[str] = []
    for prev, cur in pairs:
        for budget in budgets:
            a, b = cells.get((prev, budget)), cells.get((cur, budget))
            if a is None or b is None:
                continue
            tok_a, tok_b = a.metrics["mean_output_tokens"], b.metrics["mean_output_tokens"]
            tokens = f"{100.0 * (tok_b - tok_a) / tok_a:+.1f}%" if tok_a else "n/a"
            points = 100.0 * (b.metrics["pass@1"] - a.metrics["pass@1"])
            lines.append(f"{cur} vs {prev} @{budget}: tokens {tokens}, pass@1 {points:+.1f} pts")
    return lines


def format_table(rows: Sequence[RowLike], comparisons: bool = True) -> str:
    """Markdown table: one row per model; per token budget a ``pass@1`` column (percent, one
    decimal) and a ``tokens`` column (mean output tokens, thousands separator). Missing
    cells show ``-``. With ``comparisons`` the :func:`format_comparisons` lines follow."""
    models, budgets, cells = _index(_as_rows(rows))
    header = ["model"]
    for budget in budgets:
        header += [f"pass@1 @{budget}", f"tokens @{budget}"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for model in models:
        cols = [model]
        for budget in budgets:
            row = cells.get((model, budget))
            if row is None:
                cols += ["-", "-"]
            else:
                cols.append(_fmt_pass(row.metrics["pass@1"]))
                cols.append(_fmt_tokens(row.metrics["mean_output_tokens"]))
        lines.append("| " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n"
    if comparisons:
        extra = format_comparisons(rows)
        if extra:
            text += "\n" + "\n".join(f"- {line}" for line in extra) + "\n"
    return text


def _cell(row: EvalRow, key: str, fmt) -> str:
    value = row.metrics.get(key)
    return "-" if value is None else fmt(value)


def format_details(rows: Sequence[RowLike]) -> str:
    """Markdown table, one line per (model, budget): pass@1 with its 95% bootstrap interval,
    mean / p50 / p90 output tokens, tokens per correct answer and the truncated share (``-``
    where an evaluation did not record one)."""
    lines = ["| model | budget | pass@1 [95% CI] | mean tokens | p50 | p90 | tokens / correct | truncated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in _as_rows(rows):
        ci = row.metrics.get("pass@1_ci95")
        interval = f" [{_fmt_pass(ci[0])}, {_fmt_pass(ci[1])}]" if ci is not None else ""
        lines.append("| " + " | ".join([
            row.model, str(row.token_budget), _fmt_pass(row.metrics["pass@1"]) + interval,
            _fmt_tokens(row.metrics["mean_output_tokens"]), _cell(row, "p50_output_tokens", _fmt_tokens),
            _cell(row, "p90_output_tokens", _fmt_tokens), _cell(row, "tokens_per_correct", _fmt_tokens),
            _cell(row, "truncated_share", lambda v: f"{100.0 * v:.1f}%"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def kept_line(kept: Mapping[str, Any]) -> str:
    """Which GRPO step the stage output and why (``<grpo dir>/kept.json``)."""
    return f"GRPO output: step {kept['step']} of {kept['of_steps']}. {kept['reason']}."


def write_report(rows: Sequence[RowLike], directory: Path, meta: Mapping[str, Any],
                 metrics: Sequence[Mapping[str, Any]] | None = None, kept: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``report.json``, ``report.md`` and, with ``metrics`` (metrics.jsonl's
    records), ``report.png`` (``evaluation.report_plot``), which report.md embeds, into
    ``directory`` (created if needed). ``kept``: the GRPO stage's ``kept.json``, reported as
    ``meta["grpo_kept"]`` and one line of report.md."""
    eval_rows = _as_rows(rows)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**meta, **({"grpo_kept": dict(kept)} if kept is not None else {})}
    payload = {"evaluations": [r.to_dict() for r in eval_rows], "meta": meta}
    atomic_write_json(directory / "report.json", payload)
    text = "# Evaluation report\n\n" + format_table(eval_rows) + "\n" + format_details(eval_rows)
    if kept is not None:
        text += "\n" + kept_line(kept) + "\n"
    if metrics is not None:
        from fastmath_nemo.evaluation.report_plot import plot_report  # matplotlib only when drawing

        plot_report(metrics, eval_rows, directory / "report.png", kept["step"] if kept is not None else None)
        text += "\n![GRPO reward, accuracy and tokens over steps; SFT loss; pass@1 against tokens](report.png)\n"
    atomic_write_text(directory / "report.md", text)
