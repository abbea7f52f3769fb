"""The samples behind an evaluation, one JSON object per line, for a person to read.

``eval/<model>@<budget>.samples.jsonl`` holds every graded completion: when pass@1 is 0.0,
this file shows whether the model answered in another format, ran out of tokens, or the
extraction missed its answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastmath_nemo.checkpoint.atomic import atomic_write_text
from fastmath_nemo.evaluation.metrics import SampleResult


@dataclass
class EvalSample:
    """One graded completion, as written to the samples file.

    problem_id:       index of the problem in the evaluation set
    sample:           which of the problem's ``n_samples`` completions (0-based)
    extracted_answer: the last ``\\boxed{}`` of the completion (None when there is none)
    tokens:           generated tokens, stop token included
    finish_reason:    "stop" (stop string or EOS) or "length" (hit the token budget)
    """

    problem_id: int
    sample: int
    problem: str
    gold: str
    completion: str
    extracted_answer: str | None
    correct: bool
    tokens: int
    finish_reason: str

    def result(self) -> SampleResult:
        """What the metrics need of this sample."""
        return SampleResult(problem_id=self.problem_id, answer=self.extracted_answer, correct=self.correct,
                            num_tokens=self.tokens, truncated=self.finish_reason == "length")


def write_samples(path: Path, samples: Iterable[EvalSample]) -> None:
    """``path`` as JSON lines in (problem_id, sample) order, written atomically."""
    ordered = sorted(samples, key=lambda s: (s.problem_id, s.sample))
    lines = (json.dumps(dataclasses.asdict(s), ensure_ascii=False) + "\n" for s in ordered)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))

