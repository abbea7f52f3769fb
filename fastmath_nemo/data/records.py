"""The record type every data loader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MathRecord:
    """One math problem.

    problem: the question text shown to the model.
    answer:  the reference final answer (a string, e.g. ``"42"`` or ``"\\frac{1}{2}"``), used by
             the reward / evaluation verifier.
    trace:   a worked solution used as the SFT target; ``None`` for RL-only data.
    source:  where the record came from, for error messages (``"file.jsonl:17"``,
             ``"file.parquet: row 3"``).
    """

    problem: str
    answer: str
    trace: str | None = None
    source: str = ""
