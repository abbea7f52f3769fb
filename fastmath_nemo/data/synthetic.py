"""The embedded default task: seeded multi-step arithmetic with R1-style reasoning traces.

Each problem chains two operations on two-digit operands ("What is 47+38-29?"). The problem
writes the expression exactly as the trace does, so a small model copies operands from it by
matching tokens; the column work spaces its operators (" +" is another token than "+"), so
its many "+1" carries never look like the start of an operand to copy.
A trace works column by column, boxes the answer, then adds 0..max_checks redundant
self-checks ("Wait, let me double-check ...") before ``</think>``, like R1 traces:

    <think>
    47+38: 7 + 8 = 15, 4 + 3 + 1 = 8, so 85.
    85-29: 15 - 9 = 6, 8 - 2 - 1 = 5, so 56.
    The answer is \\boxed{56}.
    Wait, let me double-check. 47+38: 7 + 8 = 15, 4 + 3 + 1 = 8, so 85. 85-29: ... Yes, \\boxed{56}.
    </think>

So SFT has arithmetic to teach and GRPO has redundant length to remove.
"""

from __future__ import annotations

import random

from fastmath_nemo.config.schema import SyntheticTaskConfig  # defined with the config
from fastmath_nemo.data.records import MathRecord

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TEMPLATES = ("What is {expr}?", "Compute {expr}.", "Evaluate {expr}.", "Find the value of {expr}.")
# One opener, as R1's "Wait": with several, sampling at temperature < 1 sharpens towards
# "</think>" (the single most likely next token) and hides the redundant length from GRPO.
CHECK_OPENER = "Wait, let me double-check."


def _digits(n: int) -> list[int]:
    """Least significant digit first."""
    return [int(c) for c in reversed(str(n))]


def _column_addition(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    parts, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([1] if carry else [])
        total = sum(terms)
        parts.append(f"{' + '.join(map(str, terms))} = {total}")
        carry = total // 10
    return f"{a}+{b}: {', '.join(parts)}, so {a + b}."


def _column_subtraction(a: int, b: int) -> str:
    """a >= b. A borrow shows as '1' prefixed to the top digit and '- 1' in the next column."""
    da, db = _digits(a), _digits(b)
    parts, borrow = [], 0
    for i in range(len(da)):
        top, bottom = da[i], (db[i] if i < len(db) else None)
        value = top - (bottom or 0) - borrow
        new_borrow = 1 if value < 0 else 0
        shown_top = top + 10 * new_borrow
        terms = [str(shown_top)] + ([str(bottom)] if bottom is not None else []) + (["1"] if borrow else [])
        parts.append(f"{' - '.join(terms)} = {value + 10 * new_borrow}")
        borrow = new_borrow
    return f"{a}-{b}: {', '.join(parts)}, so {a - b}."


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def make_problem(rng: random.Random, cfg: SyntheticTaskConfig) -> tuple[str, list[tuple[int, str, int]], int]:
    """Returns (expression, steps [(left, op, right)], answer); every partial result >= 10
    and every subtraction is two-digit minus two-digit."""
    while True:
        operands = [rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(cfg.n_ops + 1)]
        ops = [rng.choice("+-") for _ in range(cfg.n_ops)]
        value, steps, ok = operands[0], [], True
        for op, right in zip(ops, operands[1:]):
            # A subtraction takes a two-digit minuend: a borrow never crosses into hundreds.
            ok = ok and (op == "+" or value < 100)
            steps.append((value, op, right))
            value = _apply(op, value, right)
            ok = ok and value >= 10
        if ok:
            expr = "".join([str(operands[0])] + [f"{op}{x}" for op, x in zip(ops, operands[1:])])
            return expr, steps, value


def make_trace(steps: list[tuple[int, str, int]], answer: int, n_checks: int, rng: random.Random) -> str:
    work = [_column_addition(a, b) if op == "+" else _column_subtraction(a, b) for a, op, b in steps]
    lines = [THINK_OPEN, *work, f"The answer is \\boxed{{{answer}}}."]
    for _ in range(n_checks):
        # A full redo of the column work: about as long as the solution, and redundant.
        lines.append(f"{CHECK_OPENER} {' '.join(work)} Yes, \\boxed{{{answer}}}.")
    lines.append(THINK_CLOSE)
    return "\n".join(lines)


def _check_count(rng: random.Random, cfg: SyntheticTaskConfig) -> int:
    if cfg.check_weights is None:
        return rng.randint(0, cfg.max_checks)
    return rng.choices(range(cfg.max_checks + 1), weights=cfg.check_weights)[0]


def generate_splits(cfg: SyntheticTaskConfig) -> tuple[list[MathRecord], list[MathRecord]]:
    """(train, held_out): distinct problem texts, no expression shared between the splits."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    records: list[MathRecord] = []
    attempts = 0
    while len(records) < cfg.n_train + cfg.n_eval:
        attempts += 1
        if attempts > 100 * (cfg.n_train + cfg.n_eval):
            raise ValueError("synthetic task: operand range too small for the requested split sizes")
        expr, steps, answer = make_problem(rng, cfg)
        if expr in seen:
            continue
        seen.add(expr)
        trace = make_trace(steps, answer, _check_count(rng, cfg), rng)
        problem = rng.choice(_TEMPLATES).format(expr=expr)
        records.append(MathRecord(problem=problem, answer=str(answer), trace=trace, source=f"synthetic:{len(records)}"))
    return records[: cfg.n_train], records[cfg.n_train :]
