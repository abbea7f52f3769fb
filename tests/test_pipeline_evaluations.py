"""Which evaluations a model gets: every token budget, then (L1) every prompted budget."""

from __future__ import annotations

from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.pipeline import evaluations_of
from fastmath_nemo.preflight import load_config


def test_prompted_budgets_are_written_into_the_problems_at_the_largest_budget() -> None:
    cfg = load_config("grpo_l1", ["eval.token_budgets=[200,400]", "eval.prompted_budgets=[60,100]"])
    records = [MathRecord(problem="What is 1+2?", answer="3")]
    out = evaluations_of("grpo", records, cfg)
    assert [(label, budget) for label, budget, _ in out] == [
        ("grpo", 200), ("grpo", 400), ("grpo|think 60", 400), ("grpo|think 100", 400)]
    assert out[0][2] is records
    assert out[2][2][0].problem == "What is 1+2?\n\nThink for 60 tokens."
    assert out[3][2][0].answer == "3"
    assert [label for label, _, _ in evaluations_of("grpo", records, load_config("recipe"))] == ["grpo"]
