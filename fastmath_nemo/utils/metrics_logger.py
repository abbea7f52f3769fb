"""Append-only JSON-lines metrics log (``metrics.jsonl``) plus a one-line INFO summary.

Each line is ``{"stage": ..., "step": ..., "time": <unix seconds>, <metric>: <value>, ...}``.
Tensors and NumPy scalars become Python numbers. NaN and +/-inf are written as ``null``:
JSON has no literal for them and Python's ``NaN``/``Infinity`` tokens break strict parsers.

**Resumed runs.** A run killed between checkpoints may have logged steps after its last
checkpoint; the resumed run trains those steps again and logs them again. The file stays
append-only (the killed run's lines remain for forensics): :meth:`MetricsLogger.resume`
appends a marker ``{"stage": "resume", "step": k, "resumed_stage": S, "superseded": n}``, and
the rule every reader applies (:func:`read_metrics` does; ``raw=True`` skips it) is: a marker
drops the records *before it* of stage ``S`` with ``step > k``, and is itself not a record.
A marker is written only when there is something to supersede, so a run resumed exactly at its
last logged step (a preemption) leaves the file as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from fastmath_nemo.utils.distributed import is_rank0
from fastmath_nemo.utils.metric_sinks import MetricSink

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
_RESERVED = ("stage", "step", "time")
RESUME_STAGE = "resume"  # the stage of resume markers (see the module docstring)


def _resolve(path: Path) -> Path:
    """A path with a suffix is the file itself; otherwise it is a directory holding
    ``metrics.jsonl``."""
    path = Path(path)
    return path / METRICS_FILENAME if path.suffix == "" or path.is_dir() else path


def _to_scalar(name: str, value: Any) -> Any:
    """Python scalar (bool/int/float/str/None) for ``value``; floats may be non-finite."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "item") and hasattr(value, "size")):
        # torch tensors and NumPy scalars/arrays; both expose .item() for one element.
        count = value.numel() if isinstance(value, torch.Tensor) else value.size
        if count != 1:
            raise ValueError(f"metric {name!r} has {count} elements; log a scalar")
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float(value)  # np.float64 is a float subclass; store the plain type
    raise TypeError(f"metric {name!r} has unsupported type {type(value).__name__}")


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MetricsLogger:
    """Writes one JSON object per :meth:`log` call to ``metrics.jsonl``, flushed per line.

    path:         the ``.jsonl`` file, or a directory to hold ``metrics.jsonl``; None logs
                  the summary line only
    enabled:      defaults to ``is_rank0()`` so only rank 0 writes and logs
    summary_keys: metrics shown in the INFO line (those present); default: the first six
    sinks:        more destinations of every record (``utils.metric_sinks``: TensorBoard, wandb)
    """

    def __init__(
        self,
        path: Path | None,
        enabled: bool | None = None,
        summary_keys: Sequence[str] | None = None,
        sinks: Sequence[MetricSink] = (),
    ) -> None:
        self.enabled = is_rank0() if enabled is None else enabled
        self.file: Path | None = _resolve(path) if path is not None else None
        self.summary_keys = tuple(summary_keys) if summary_keys is not None else None
        self._handle: IO[str] | None = None
        self.sinks = list(sinks)

    def log(
        self, stage: str, step: int, metrics: Mapping[str, Any], console: bool = True
    ) -> dict[str, Any] | None:
        """Record ``metrics`` for ``stage`` at ``step``; returns the record written (None when
        disabled). ``console=False`` skips the INFO line (the file always gets the record)."""
        if not self.enabled:
            return None
        if stage == RESUME_STAGE:
            raise ValueError(f"stage name {RESUME_STAGE!r} is reserved for resume markers")
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names clash with reserved keys: {clash}")
        scalars = {str(name): _to_scalar(name, value) for name, value in metrics.items()}
        record: dict[str, Any] = {"stage": stage, "step": int(step), "time": time.time()}
        record.update((name, _json_safe(value)) for name, value in scalars.items())
        if self.file is not None:
            line = json.dumps(record, allow_nan=False, ensure_ascii=False)
            if self._handle is None:
                self._handle = self._open()
            self._handle.write(line + "\n")
            self._handle.flush()
        for sink in self.sinks:
            sink.write(stage, step, scalars)
        if console:
            logger.info("%s", self._summary(stage, step, scalars))
        return record

    def resume(self, stage: str, step: int) -> int:
        """The run resumes ``stage`` from its checkpoint of ``step``: records of ``stage`` after
        ``step`` (logged by a killed run) are superseded by a marker; returns how many (0 and
        no marker when none, or when disabled)."""
        if not self.enabled or self.file is None or not self.file.exists():
            return 0
        stale = sum(r["stage"] == stage and r["step"] > step for r in read_metrics(self.file))
        if stale:
            if self._handle is None:
                self._handle = self._open()
            marker = {"stage": RESUME_STAGE, "step": int(step), "time": time.time(), "resumed_stage": stage,
                      "superseded": stale}
            self._handle.write(json.dumps(marker) + "\n")
            self._handle.flush()
            logger.info("%s resumes at step %d: %d records logged after it by the killed run are superseded",
                        stage, step, stale)
        return stale

    def _open(self) -> IO[str]:
        assert self.file is not None
        self.file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.file, "a", encoding="utf-8")
        # After a crash mid-write the file may end in a torn line; start a fresh one so the
        # next record is not glued onto it.
        if self.file.stat().st_size > 0:
            with open(self.file, "rb") as existing:
                existing.seek(-1, 2)
                if existing.read(1) != b"\n":
                    handle.write("\n")
        return handle

    def _summary(self, stage: str, step: int, scalars: Mapping[str, Any]) -> str:
        if self.summary_keys is None:
            keys = list(scalars)[:6]
        else:
            keys = [k for k in self.summary_keys if k in scalars]
        parts = " ".join(f"{k}={_fmt(scalars[k])}" for k in keys)
        return f"{stage} step {step}" + (f" | {parts}" if parts else "")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: Path, strict: bool = False, raw: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics file (or a directory holding ``metrics.jsonl``), in order, with
    the resume rule applied (see the module docstring): each step of a stage once, as the run
    that went on to finish logged it. ``raw=True``: every line as written, markers included.

    Lines torn by a crash mid-write are skipped with a warning, or raise with ``strict``.
    """
    records: list[dict[str, Any]] = []
    text = _resolve(path).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise
            logger.warning("skipping corrupt line %d of %s", lineno, path)
    return records if raw else _apply_resumes(records)


def _apply_resumes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the records each resume marker supersedes, and the markers."""
    kept: list[dict[str, Any]] = []
    for record in records:
        if record.get("stage") == RESUME_STAGE and "resumed_stage" in record:
            stage, step = record["resumed_stage"], record["step"]
            kept = [r for r in kept if not (r.get("stage") == stage and r.get("step", 0) > step)]
        else:
            kept.append(record)
    return kept
