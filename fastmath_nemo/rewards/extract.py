"""Answer extraction from model completions (pure string code, no sympy)."""

from __future__ import annotations

import re

__all__ = ["last_boxed_answer", "think_section", "THINK_END"]

THINK_END = "</think>"

_BOXED_RE = re.compile(r"\\boxed\s*\{")


def last_boxed_answer(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` in ``text``.

    Braces are matched with a depth counter, so nested groups such as
    ``\boxed{\frac{1}{2}}`` yield ``\frac{1}{2}``. Escaped braces (``\{``, ``\}``)
    are skipped so set answers like ``\boxed{\{1,2\}}`` work.

    Returns None if there is no ``\boxed{`` or the last one is unbalanced
    (e.g. a completion truncated mid-answer): an earlier box is deliberately not
    used, because the model's final answer is the last one.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    start = starts[-1]  # index just after the opening brace
    depth = 1
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped char: `\{` / `\}` are not grouping braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def think_section(text: str) -> str | None:
    """Text before the first ``</think>``; None if the completion never closes its thinking."""
    idx = text.find(THINK_END)
    return None if idx < 0 else text[:idx]
