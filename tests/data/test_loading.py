"""Tests for fastmath_nemo.data.loading (all data is built locally; nothing touches the network)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastmath_nemo.data.loading import DataError, LoadReport, load_records
from fastmath_nemo.data.records import MathRecord


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: local paths must never reach the Hub."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(problem: object = "What is 1+1?", answer: object = "2", **extra: object) -> str:
    return json.dumps({"problem": problem, "answer": answer, **extra})


RECORDS = [
    MathRecord("What is 1+1?", "2", "1+1 = 2, so \\boxed{2}."),
    MathRecord("Simplify 2/4.", "\\frac{1}{2}", "Divide by 2: \\boxed{\\frac{1}{2}}."),
    MathRecord("Solve x^2 = 4, x > 0.", "2", "x = 2 \\boxed{2}"),
]


def test_jsonl_basic_and_number_answers(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "a.jsonl",
        [row("p1", 42, tag={"x": [1, 2]}), row("p2", "007", tag=5), "", row("p3", 0.5), row("p4", " \\frac{1}{2} ")],
    )
    recs = load_records(path)
    assert [(r.problem, r.answer) for r in recs] == [
        ("p1", "42"),
        ("p2", "007"),  # strings stay strings even when the column mixes in numbers
        ("p3", "0.5"),
        ("p4", "\\frac{1}{2}"),
    ]
    assert [r.source for r in recs] == [f"{path}:{n}" for n in (1, 2, 4, 5)]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [row(), row(), '{"problem": "x", "answer": ', row()])
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_records(path)


def test_non_object_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [row(), "[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object, got list"):
        load_records(path)


def test_missing_field_names_field_and_fields_present(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [row(), json.dumps({"problem": "p", "solution": "s"})])
    expected = r"m.jsonl:2: missing field 'answer' \(fields present: \['problem', 'solution'\]\)"
    with pytest.raises(DataError, match=expected):
        load_records(path)


def test_null_field_says_null_not_missing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "n.jsonl", [row(), json.dumps({"problem": "p", "answer": None})])
    expected = r"n.jsonl:2: null field 'answer' \(fields present: \['answer', 'problem'\]\)"
    with pytest.raises(DataError, match=expected):
        load_records(path)


def test_field_absent_from_whole_file_raises_even_when_skipping(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"question": "p", "answer": "1"})])
    with pytest.raises(DataError, match=r"field 'problem' not found; fields present: \['answer', 'question'\]"):
        load_records(path, skip_bad_rows=True)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (row(problem="   "), "empty problem"),
        (row(answer=" "), "empty answer"),
        (row(answer="\\frac{1}{2"), "unbalanced braces"),
        (row(answer="1}"), "unbalanced braces"),
        (row(answer=True), "must be a string or number, got bool"),
        (row(answer=[1]), "must be a string or number, got list"),
    ],
)
def test_bad_rows_raise_with_reason(tmp_path: Path, line: str, reason: str) -> None:
    path = write_lines(tmp_path / "r.jsonl", [row(), line])
    with pytest.raises(DataError, match=rf"r.jsonl:2: .*{reason}"):
        load_records(path)


def test_escaped_braces_are_balanced(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "b.jsonl", [row(answer="\\{1, 2\\}"), row(answer="\\left\\{ x \\right.")])
    assert [r.answer for r in load_records(path)] == ["\\{1, 2\\}", "\\left\\{ x \\right."]


def test_trace_field_validation(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [row(sol="ok \\boxed{2}"), row(sol="  "), row()])
    with pytest.raises(DataError, match=r"t.jsonl:2: empty trace"):
        load_records(path, trace_field="sol")
    report = LoadReport()
    recs = load_records(path, trace_field="sol", skip_bad_rows=True, report=report)
    assert [r.trace for r in recs] == ["ok \\boxed{2}"]
    assert [str(b) for b in report.skipped] == [
        f"{path}:2: empty trace (field 'sol')",
        f"{path}:3: missing field 'sol' (fields present: ['answer', 'problem'])",
    ]


def test_skip_bad_rows_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_lines(
        tmp_path / "s.jsonl",
        [row("p1"), "{not json", row("p3", answer=""), row("p4"), json.dumps({"problem": "p5"}), row("p6")],
    )
    report = LoadReport()
    with caplog.at_level(logging.WARNING, logger="fastmath_nemo.data.loading"):
        recs = load_records(path, skip_bad_rows=True, report=report)
    assert [r.problem for r in recs] == ["p1", "p4", "p6"]
    assert [r.source for r in recs] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert report.num_skipped == 3 and report.rows_read == 6 and report.loaded == 3
    assert [b.location for b in report.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 3 bad row(s) of 6" in message
    assert f"{path}:2: malformed JSON" in message
    assert f"{path}:3: empty answer" in message
    assert f"{path}:5: missing field 'answer'" in message


def test_all_rows_bad_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [row(answer=""), row(answer="")])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        load_records(path, skip_bad_rows=True)


def test_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "l.jsonl", [row(f"p{i}") for i in range(10)])
    assert [r.problem for r in load_records(path, limit=3)] == ["p0", "p1", "p2"]
    assert load_records(path, limit=0) == []


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"problem": "p1", "answer": "007"},\n  {"problem": "p2", "answer": 3}\n]\n')
    recs = load_records(path)
    assert [(r.problem, r.answer, r.source) for r in recs] == [
        ("p1", "007", f"{path}:2"),
        ("p2", "3", f"{path}:3"),
    ]


def test_glob_characters_in_path(tmp_path: Path) -> None:
    # datasets treats data_files as glob patterns; an unescaped "[1]" would match nothing.
    path = write_lines(tmp_path / "run[1].jsonl", [row()])
    assert len(load_records(path)) == 1


def test_missing_path_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "x.csv")


def test_jsonl_with_custom_fields(tmp_path: Path) -> None:
    lines = [json.dumps({"q": r.problem, "a": r.answer, "sol": r.trace}) for r in RECORDS]
    path = write_lines(tmp_path / "rt.jsonl", lines)
    recs = load_records(path, problem_field="q", answer_field="a", trace_field="sol")
    assert [(r.problem, r.answer, r.trace) for r in recs] == [(r.problem, r.answer, r.trace) for r in RECORDS]


def test_parquet_round_trip_with_custom_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table(
        {
            "question": [r.problem for r in RECORDS] + ["bad row"],
            "final": [r.answer for r in RECORDS] + [""],
            "solution": [r.trace for r in RECORDS] + ["t"],
            "unused": [1, 2, 3, 4],
        }
    )
    pq.write_table(table, path)
    kwargs = dict(problem_field="question", answer_field="final", trace_field="solution")
    with pytest.raises(DataError, match=rf"{path}: row 3: empty answer"):
        load_records(path, **kwargs)
    recs = load_records(path, skip_bad_rows=True, **kwargs)
    assert [(r.problem, r.answer, r.trace) for r in recs] == [(r.problem, r.answer, r.trace) for r in RECORDS]
    assert recs[1].source == f"{path}: row 1"


def test_parquet_integer_answers(tmp_path: Path) -> None:
    path = tmp_path / "i.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": [42, -1]}), path)
    assert [r.answer for r in load_records(path)] == ["42", "-1"]


def test_arrow_file(tmp_path: Path) -> None:
    path = tmp_path / "d.arrow"
    table = pa.table({"problem": ["a", "b"], "answer": ["1", None]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match=rf"{path}: row 1: null field 'answer'"):  # a null cell, not a missing column
        load_records(path)


def test_saved_dataset_dir_round_trip(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    data = {
        "q": [r.problem for r in RECORDS],
        "ans": [r.answer for r in RECORDS],
        "cot": [r.trace for r in RECORDS],
    }
    single = tmp_path / "single"
    Dataset.from_dict(data).save_to_disk(str(single))
    recs = load_records(single, problem_field="q", answer_field="ans", trace_field="cot")
    assert [(r.problem, r.answer, r.trace) for r in recs] == [(r.problem, r.answer, r.trace) for r in RECORDS]
    assert recs[2].source == f"{single}: row 2"

    both = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_dict(data), "test": Dataset.from_dict(data).select([0])}).save_to_disk(str(both))
    test_recs = load_records(both, problem_field="q", answer_field="ans", split="test")
    assert [r.problem for r in test_recs] == [RECORDS[0].problem]
    assert test_recs[0].source == f"{both}[test]: row 0"
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\]; pass split="):
        load_records(both, problem_field="q", answer_field="ans")
    with pytest.raises(DataError, match="no split 'dev'"):
        load_records(both, problem_field="q", answer_field="ans", split="dev")


def test_plain_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="save_to_disk"):
        load_records(tmp_path)
