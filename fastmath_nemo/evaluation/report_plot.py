"""``report.png``: the run at a glance, from ``metrics.jsonl`` and the evaluation rows.

    +----------------------+----------------------+----------------------+
    | GRPO reward          | GRPO accuracy        | GRPO mean tokens     |
    |                      | (+ held-out pass@1)  | (+ held-out, kept)   |
    +----------------------+----------------------+----------------------+
    | SFT loss             | pass@1 vs mean tokens per model and budget  |
    +----------------------+---------------------------------------------+

A panel whose stage did not run says so. Drawn with matplotlib's object API on the Agg
canvas (no pyplot state, no display needed), at a fixed size: SIZE_INCHES x DPI pixels.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastmath_nemo.checkpoint.atomic import atomic_write_bytes

SIZE_INCHES = (15.0, 8.0)
DPI = 100  # 1500 x 800 pixels


def _series(records: Sequence[Mapping[str, Any]], stage: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in ``stage``'s records, skipping records without a number."""
    points = [(r["step"], r[key]) for r in records if r.get("stage") == stage and isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes, color="grey")


def _line(ax: Any, records: Sequence[Mapping[str, Any]], stage: str, key: str, title: str, ylabel: str) -> bool:
    steps, values = _series(records, stage, key)
    ax.set_title(title)
    ax.set_xlabel(f"{stage.upper()} step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not steps:
        _empty(ax, f"{stage} {key}")
        return False
    ax.plot(steps, values, color="tab:blue", linewidth=1.2, label="training rollouts" if stage == "grpo" else None)
    return True


def _heldout(ax: Any, records: Sequence[Mapping[str, Any]], key: str, kept_step: int | None) -> None:
    """Held-out evaluations as points on a GRPO panel; the kept step as a vertical line."""
    steps, values = _series(records, "grpo_heldout", key)
    if steps:
        ax.plot(steps, values, "o--", color="tab:orange", label="held-out")
    if kept_step is not None:
        ax.axvline(kept_step, color="tab:green", linestyle=":", label=f"kept: step {kept_step}")
    if steps or kept_step is not None:
        ax.legend(fontsize=8)


def _pass_vs_tokens(ax: Any, rows: Sequence[Any]) -> None:
    """One marker per (model, budget); a model's budgets joined by a line, in budget order."""
    ax.set_title("evaluation: pass@1 against mean output tokens")
    ax.set_xlabel("mean output tokens")
    ax.set_ylabel("pass@1 (%)")
    ax.grid(alpha=0.3)
    if not rows:
        _empty(ax, "evaluation")
        return
    models = list(dict.fromkeys(r.model for r in rows))
    for i, model in enumerate(models):
        mine = sorted((r for r in rows if r.model == model), key=lambda r: r.token_budget)
        xs = [float(r.metrics["mean_output_tokens"]) for r in mine]
        ys = [100.0 * float(r.metrics["pass@1"]) for r in mine]
        ax.plot(xs, ys, marker="os^Dv<>"[i % 7], markersize=8, label=model)
        for r, x, y in zip(mine, xs, ys):
            ax.annotate(f"@{r.token_budget}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.legend()


def plot_report(records: Sequence[Mapping[str, Any]], rows: Sequence[Any], path: Path,
                kept_step: int | None = None) -> None:
    """Write the figure to ``path`` (atomically). ``records``: metrics.jsonl's records (stages
    ``sft``, ``grpo``, ``grpo_heldout``); ``rows``: :class:`~fastmath_nemo.evaluation.report.EvalRow`
    items; ``kept_step``: the GRPO step whose weights the stage output, marked when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3)
    reward, accuracy, tokens = (fig.add_subplot(grid[0, i]) for i in range(3))
    _line(reward, records, "grpo", "reward/mean", "GRPO reward (mean of the step's rollouts)", "reward")
    if _line(accuracy, records, "grpo", "accuracy", "GRPO accuracy", "share correct"):
        _heldout(accuracy, records, "heldout/pass@1", kept_step)
    if _line(tokens, records, "grpo", "completion/mean_tokens", "GRPO mean completion tokens", "tokens"):
        _heldout(tokens, records, "heldout/mean_tokens", kept_step)
    _line(fig.add_subplot(grid[1, 0]), records, "sft", "loss", "SFT loss", "loss (token mean)")
    _pass_vs_tokens(fig.add_subplot(grid[1, 1:]), rows)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
