"""run.loggers: what MetricsLogger writes to metrics.jsonl reaches TensorBoard (read back with
TensorBoard's own EventAccumulator) and an offline wandb run, under the same names."""

from __future__ import annotations

import pytest

from fastmath_nemo.utils.metric_sinks import build_sinks
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics

STEPS = {"sft": [{"loss": 2.5, "lr": 1e-3}, {"loss": 1.25, "lr": 5e-4}],
         "grpo": [{"reward/mean": -0.3, "accuracy": 0.5, "note": "text stays in metrics.jsonl"},
                  {"reward/mean": 0.7, "accuracy": 0.75, "note": "x"}]}


def log_all(tmp_path, loggers: list[str]) -> MetricsLogger:
    logger = MetricsLogger(tmp_path / "metrics.jsonl", enabled=True,
                           sinks=build_sinks(loggers, tmp_path, "test-run", {"grpo": {"steps": 2}}))
    for stage, steps in STEPS.items():
        for step, metrics in enumerate(steps, start=1):
            logger.log(stage, step, metrics)
    return logger


def test_tensorboard_events_hold_the_jsonl_names_and_values(tmp_path):
    pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_all(tmp_path, ["jsonl", "tensorboard"]).close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = {(f"{r['stage']}/{k}", r["step"], v) for r in read_metrics(tmp_path / "metrics.jsonl")
                for k, v in r.items() if k not in ("stage", "step", "time") and not isinstance(v, str)}
    assert {tag for tag, _, _ in expected} == set(events.Tags()["scalars"]) == {
        "sft/loss", "sft/lr", "grpo/reward/mean", "grpo/accuracy"}
    got = {(tag, e.step, e.value) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    # TensorBoard stores float32: the values agree to float32 precision
    assert len(got) == len(expected) == 8
    for tag, step, value in expected:
        (match,) = [v for t, s, v in got if (t, s) == (tag, step)]
        assert match == pytest.approx(value, rel=1e-6)


def test_wandb_offline_run_gets_the_same_names(tmp_path):
    pytest.importorskip("wandb", reason="the dev extra installs wandb")
    logger = log_all(tmp_path, ["jsonl", "wandb"])
    (sink,) = logger.sinks
    # wandb 0.31 has no reader of offline run files; its in-process run summary holds the last
    # value of each metric, and each stage's own step axis
    summary = dict(sink.run.summary)
    assert {k: summary[k] for k in ("sft/loss", "sft/lr", "sft/step", "grpo/reward/mean", "grpo/accuracy",
                                    "grpo/step")} == {"sft/loss": 1.25, "sft/lr": 5e-4, "sft/step": 2,
                                                      "grpo/reward/mean": 0.7, "grpo/accuracy": 0.75, "grpo/step": 2}
    assert "grpo/note" not in summary
    assert dict(sink.run.config) == {"grpo": {"steps": 2}}
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
