import json

import pytest

from fastmath_nemo.evaluation.report import EvalRow, format_comparisons, format_details, format_table, write_report


def _rows():
    def row(model, budget, p, tokens):
        return EvalRow(
            model,
            budget,
            {"pass@1": p, "mean_output_tokens": tokens, "n_problems": 200, "n_samples": 4,
             "maj@4": p + 0.05, "truncated_share": 0.1},
        )

    return [
        row("base", 512, 0.41, 480.0),
        row("base", 1024, 0.45, 900.4),
        row("sft", 512, 0.669, 500.0),
        row("sft", 1024, 0.70, 1234.4),
        row("grpo", 512, 0.664, 329.0),
        row("grpo", 1024, 0.71, 617.2),
    ]


def test_format_table_cells():
    table = format_table(_rows(), comparisons=False)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | pass@1 @512 | tokens @512 | pass@1 @1024 | tokens @1024 |"
    assert lines[2] == "| base | 41.0 | 480 | 45.0 | 900 |"
    assert lines[3] == "| sft | 66.9 | 500 | 70.0 | 1,234 |"
    assert lines[4] == "| grpo | 66.4 | 329 | 71.0 | 617 |"
    assert len(lines) == 5


def test_comparisons_vs_previous_model():
    lines = format_comparisons(_rows())
    assert "sft vs base @512: tokens +4.2%, pass@1 +25.9 pts" in lines
    assert "grpo vs sft @512: tokens -34.2%, pass@1 -0.5 pts" in lines
    assert "grpo vs sft @1024: tokens -50.0%, pass@1 +1.0 pts" in lines
    assert len(lines) == 4
    assert "grpo vs sft @512: tokens -34.2%, pass@1 -0.5 pts" in format_table(_rows())


def test_prompted_budget_rows_compare_with_their_own_variant():
    rows = [{"model": m, "token_budget": 400, "pass@1": p, "mean_output_tokens": t}
            for m, p, t in [("sft", 1.0, 200.0), ("sft|think 60", 0.9, 100.0), ("grpo", 1.0, 100.0),
                            ("grpo|think 60", 0.95, 60.0)]]
    assert format_comparisons(rows) == ["grpo vs sft @400: tokens -50.0%, pass@1 +0.0 pts",
                                        "grpo|think 60 vs sft|think 60 @400: tokens -40.0%, pass@1 +5.0 pts"]


def test_missing_cell_and_dict_rows():
    rows = [
        {"model": "sft", "token_budget": 512, "pass@1": 0.5, "mean_output_tokens": 12345.6},
        {"model": "grpo", "token_budget": 1024, "pass@1": 0.25, "mean_output_tokens": 10.0},
    ]
    table = format_table(rows)
    assert "| sft | 50.0 | 12,346 | - | - |" in table
    assert "| grpo | - | - | 25.0 | 10 |" in table
    assert "vs" not in table  # no shared budget to compare


def test_details_show_the_interval_percentiles_and_tokens_per_correct():
    row = EvalRow("grpo", 400, {"pass@1": 0.9875, "pass@1_ci95": [0.97, 1.0], "mean_output_tokens": 81.4,
                                "p50_output_tokens": 80.0, "p90_output_tokens": 95.5, "tokens_per_correct": 82.43,
                                "truncated_share": 0.0125})
    lines = format_details([row, {"model": "old", "token_budget": 400, "pass@1": 0.5, "mean_output_tokens": 9.0}])
    assert lines.splitlines()[2] == "| grpo | 400 | 98.8 [97.0, 100.0] | 81 | 80 | 96 | 82 | 1.2% |"
    assert lines.splitlines()[3] == "| old | 400 | 50.0 | 9 | - | - | - | - |"  # written before these existed


def test_duplicate_rows_rejected():
    rows = _rows() + [EvalRow("sft", 512, {"pass@1": 0.1, "mean_output_tokens": 1.0})]
    with pytest.raises(ValueError, match="duplicate"):
        format_table(rows)
    with pytest.raises(ValueError):
        EvalRow("x", 1, {"model": "y"})


def test_write_report(tmp_path):
    out = tmp_path / "eval"
    write_report(_rows(), out, meta={"dataset": "aime24", "seed": 0})
    data = json.loads((out / "report.json").read_text())
    assert set(data) == {"evaluations", "meta"}
    assert data["meta"] == {"dataset": "aime24", "seed": 0}
    first = data["evaluations"][0]
    assert first["model"] == "base" and first["token_budget"] == 512
    expected = {"pass@1", "mean_output_tokens", "n_problems", "n_samples", "maj@4"}
    assert expected | {"truncated_share"} <= set(first)
    assert len(data["evaluations"]) == 6
    md = (out / "report.md").read_text()
    assert "| sft | 66.9 | 500 | 70.0 | 1,234 |" in md
    assert "grpo vs sft @512: tokens -34.2%, pass@1 -0.5 pts" in md
    assert "| sft | 1024 | 70.0 | 1,234 | - | - | - | 10.0% |" in md  # the details table
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]  # no temp files
    # Round trip through EvalRow.from_dict.
    assert [EvalRow.from_dict(r) for r in data["evaluations"]] == _rows()
