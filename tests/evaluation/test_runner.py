"""evaluate(): the samples file a person can inspect, the progress label, and the gathering of
every rank's samples (two ranks simulated in one process with a scripted generator)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fastmath_nemo.config.schema import EvalConfig, GenerationConfig
from fastmath_nemo.evaluation import runner
from fastmath_nemo.generation.base import Rollouts, SamplingParams

N_SAMPLES = 2


class ScriptedGenerator:
    """Sample 0 of each prompt answers its gold in a box and stops; sample 1 rambles until
    the token budget. Records the progress label it was given."""

    def __init__(self, tokenizer: Any, golds_by_prompt: dict[tuple[int, ...], str]) -> None:
        self.tokenizer = tokenizer
        self.golds = golds_by_prompt
        self.progress: list[str | None] = []

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress: str | None = None) -> Rollouts:
        self.progress.append(progress)
        out = Rollouts()
        for p, ids in enumerate(prompt_ids):
            gold = self.golds[tuple(ids)]
            for text, reason in ((f"so \\boxed{{{gold}}}</think>", "stop"), ("let me check again and", "length")):
                out.prompt_index.append(p)
                out.token_ids.append(self.tokenizer.encode(text, add_special_tokens=False))
                out.logprobs.append([0.0] * len(out.token_ids[-1]))
                out.finish_reasons.append(reason)
        return out


@pytest.fixture
def scripted(tiny_task):
    from fastmath_nemo.data.chat import prompt_ids

    records = tiny_task.held_out[:5]
    golds = {tuple(prompt_ids(tiny_task.tokenizer, r.problem, None)): r.answer for r in records}
    return records, ScriptedGenerator(tiny_task.tokenizer, golds)


def _evaluate(tiny_task, records, generator, path: Path | None) -> dict[str, Any]:
    return runner.evaluate(generator, tiny_task.tokenizer, records, EvalConfig(n_samples=N_SAMPLES, k_values=[2]),
                           GenerationConfig(), 64, None, label="model@64", samples_path=path)


def test_samples_file_holds_every_graded_completion(tiny_task, scripted, tmp_path, caplog):
    records, generator = scripted
    path = tmp_path / "eval" / "model@64.samples.jsonl"
    with caplog.at_level(logging.INFO, logger=runner.__name__):
        summary = _evaluate(tiny_task, records, generator, path)
    assert generator.progress == ["model@64"]
    assert f"model@64: 10 samples in {path} (50% without a \\boxed{{}} answer, 50% cut by the 64-token budget)" \
        in caplog.text
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in rows] == [(p, j) for p in range(5) for j in range(N_SAMPLES)]
    first, second = rows[0], rows[1]
    assert first["problem"] == records[0].problem and first["gold"] == records[0].answer
    assert first["completion"].endswith("</think>") and first["extracted_answer"] == records[0].answer
    assert first["correct"] is True and first["finish_reason"] == "stop" and first["tokens"] > 0
    assert second["extracted_answer"] is None and second["correct"] is False and second["finish_reason"] == "length"
    assert summary["pass@1"] == pytest.approx(0.5) and summary["truncated_share"] == pytest.approx(0.5)


def test_rank0_writes_every_ranks_samples(tiny_task, scripted, tmp_path, monkeypatch):
    """Under two data-parallel ranks each generates for its share of the problems; rank 0
    alone shows the progress bar and writes the gathered samples of both."""
    records, generator = scripted
    path = tmp_path / "model@64.samples.jsonl"
    gathered: list = []
    for rank in (1, 0):  # rank 1 first, so its samples can join rank 0's gather
        monkeypatch.setattr(runner, "shard", lambda items, rank=rank: items[rank::2])
        monkeypatch.setattr(runner, "is_rank0", lambda rank=rank: rank == 0)
        if rank == 1:
            monkeypatch.setattr(runner, "all_gather_objects", lambda items: gathered.extend(items) or items)
        else:
            monkeypatch.setattr(runner, "all_gather_objects", lambda items: items + gathered)
        _evaluate(tiny_task, records, generator, path)
        assert path.exists() == (rank == 0)
    assert generator.progress == [None, "model@64"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted({r["problem_id"] for r in rows}) == list(range(5)) and len(rows) == 5 * N_SAMPLES
    assert all(r["problem"] == records[r["problem_id"]].problem for r in rows)


def test_evaluation_does_not_import_the_grpo_loop() -> None:
    import ast

    tree = ast.parse(Path(runner.__file__).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "fastmath_nemo.generation.params" in modules  # sampling_params: shared with the loop
    assert not any(m and m.startswith("fastmath_nemo.algorithms") for m in modules), modules
