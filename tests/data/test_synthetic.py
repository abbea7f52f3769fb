"""Tests for fastmath_nemo.data.synthetic: the embedded arithmetic task and its traces."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from fastmath_nemo.data.synthetic import CHECK_OPENER, THINK_CLOSE, THINK_OPEN, SyntheticTaskConfig, generate_splits

CHECK_OPENERS = (CHECK_OPENER,)
EXPR = re.compile(r"(\d+(?:[+-]\d+)+)")  # compact, as the trace's headers write it
STEP = re.compile(r"(\d+)([+-])(\d+): ((?:[\d +-]+ = \d+)(?:, [\d +-]+ = \d+)*), so (-?\d+)\.")
BOXED = re.compile(r"\\boxed\{([^}]*)\}")


@pytest.fixture(scope="module")
def splits():
    return generate_splits(SyntheticTaskConfig(seed=1234, n_train=1500, n_eval=200, max_checks=2))


def _expr(problem: str) -> str:
    match = EXPR.search(problem)
    assert match, problem
    return match.group(1)


def _tokens(expr: str) -> list[str]:
    return re.findall(r"\d+|[+-]", expr)


def _eval(expr: str) -> int:
    tokens = _tokens(expr)
    value = int(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):
        value = value + int(x) if op == "+" else value - int(x)
    return value


def shortest_correct(trace: str) -> str:
    """The trace without its redundant self-check lines."""
    return "\n".join(line for line in trace.split("\n") if not line.startswith(CHECK_OPENERS))


def _check_columns(a: int, op: str, b: int, columns: str, c: int) -> None:
    """Every column is right and the columns spell the result."""
    digits, carry_or_borrow = [], 0
    parts = columns.split(", ")
    assert len(parts) == len(str(max(a, b))), (a, op, b, columns)
    da, db = str(a)[::-1], str(b)[::-1]
    for i, part in enumerate(parts):
        lhs, rhs = part.split("=")
        terms = [int(t) for t in lhs.split(f" {op} ")]
        value = int(rhs)
        if op == "+":
            expected_terms = [int(d[i]) for d in (da, db) if i < len(d)] + ([1] if carry_or_borrow else [])
            assert terms == expected_terms, (a, b, part)
            assert value == sum(terms), part
            digits.append(value % 10)
            carry_or_borrow = value // 10
        else:
            top = terms[0]
            assert top % 10 == int(da[i]) and top in (int(da[i]), int(da[i]) + 10), (a, b, part)
            assert value == top - sum(terms[1:]), part
            assert 0 <= value <= 9, part
            if i < len(db):
                assert terms[1] == int(db[i]), part
            assert (terms[-1] == 1 and len(terms) == (3 if i < len(db) else 2)) == bool(carry_or_borrow), part
            digits.append(value)
            carry_or_borrow = 1 if top >= 10 else 0
    if op == "+" and carry_or_borrow:
        digits.append(carry_or_borrow)
    assert carry_or_borrow == 0 or op == "+", (a, b, columns)  # a >= b: no borrow out of the top
    assert int("".join(map(str, reversed(digits)))) == c, (a, op, b, columns, c)


def test_split_sizes_and_disjoint_problems(splits):
    train, held_out = splits
    assert len(train) == 1500 and len(held_out) == 200
    assert not {r.problem for r in train} & {r.problem for r in held_out}
    # stronger: no expression is shared, even under a different question template
    train_exprs = [_expr(r.problem) for r in train]
    held_exprs = [_expr(r.problem) for r in held_out]
    assert not set(train_exprs) & set(held_exprs)
    assert len(set(train_exprs)) == len(train_exprs)
    assert len(set(held_exprs)) == len(held_exprs)


def test_many_distinct_answers(splits):
    train, held_out = splits
    assert len({r.answer for r in train}) >= 100
    assert len({r.answer for r in held_out}) >= 50


def test_answers_are_the_value_of_the_expression(splits):
    for r in splits[0] + splits[1]:
        expr = _expr(r.problem)
        operands = [int(x) for x in _tokens(expr)[::2]]
        assert len(operands) == 3 and all(10 <= x <= 99 for x in operands), r.problem
        assert r.answer == str(_eval(expr)), r.problem
        assert int(r.answer) >= 10


def test_traces_box_the_record_answer_and_do_correct_arithmetic(splits):
    n_steps = 0
    for r in splits[0] + splits[1]:
        lines = r.trace.split("\n")
        assert lines[0] == THINK_OPEN and lines[-1] == THINK_CLOSE
        boxed = BOXED.findall(r.trace)
        assert boxed and all(b == r.answer for b in boxed), (r.answer, boxed)
        steps = STEP.findall(r.trace)
        assert steps, r.trace
        for a, op, b, columns, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert c == (a + b if op == "+" else a - b), (a, op, b, c)
            _check_columns(a, op, b, columns, c)
        # the first worked pass chains: left operand, partial results, the answer
        first_pass = STEP.findall(shortest_correct(r.trace))
        expr = _tokens(_expr(r.problem))
        assert int(first_pass[0][0]) == int(expr[0])
        assert [(op, int(b)) for _, op, b, _, _ in first_pass] == list(zip(expr[1::2], map(int, expr[2::2])))
        for (_, _, _, _, c), (a_next, *_rest) in zip(first_pass, first_pass[1:]):
            assert int(c) == int(a_next)
        assert first_pass[-1][4] == r.answer
        n_steps += len(steps)
    assert n_steps > 2 * len(splits[0])


def test_check_count_is_between_zero_and_max_checks(splits):
    counts = Counter(sum(line.startswith(CHECK_OPENERS) for line in r.trace.split("\n")) for r in splits[0])
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) > 0.2 * len(splits[0])


def test_check_weights_set_the_share_of_each_check_count():
    train, _ = generate_splits(SyntheticTaskConfig(seed=7, n_train=4000, n_eval=10, max_checks=2, check_weights=[1, 0, 3]))
    counts = Counter(sum(line.startswith(CHECK_OPENERS) for line in r.trace.split("\n")) for r in train)
    assert counts[1] == 0
    assert 0.72 < counts[2] / len(train) < 0.78, counts  # 3 / (1 + 0 + 3), +-6 standard deviations


@pytest.mark.parametrize("max_checks", [2, 3])
def test_traces_are_much_longer_than_the_shortest_correct_version(max_checks):
    train, _ = generate_splits(SyntheticTaskConfig(seed=99, n_train=1000, n_eval=10, max_checks=max_checks))
    mean_full = sum(len(r.trace) for r in train) / len(train)
    mean_short = sum(len(shortest_correct(r.trace)) for r in train) / len(train)
    # the shortest version still holds the work and the boxed answer
    assert all(BOXED.search(shortest_correct(r.trace)) for r in train)
    assert mean_full >= 1.6 * mean_short, (mean_full, mean_short)


def test_same_seed_same_data_different_seed_different_data():
    cfg = SyntheticTaskConfig(seed=5, n_train=100, n_eval=20)
    assert generate_splits(cfg) == generate_splits(cfg)
    other = generate_splits(SyntheticTaskConfig(seed=6, n_train=100, n_eval=20))
    assert [r.problem for r in other[0]] != [r.problem for r in generate_splits(cfg)[0]]


def test_too_small_operand_range_raises():
    with pytest.raises(ValueError, match="too small"):
        generate_splits(SyntheticTaskConfig(n_train=500, n_eval=10, min_operand=10, max_operand=12))
