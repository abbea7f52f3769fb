import json
import logging

import pytest
import torch

from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics


def _strict_loads(line: str):
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def test_writes_valid_json_lines(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as ml:
        ml.log("sft", 1, {"loss": torch.tensor(0.5), "lr": 1e-5, "tokens": torch.tensor(7)})
        ml.log("grpo", 2, {"loss": float("nan"), "kl": torch.tensor(float("inf")), "ok": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (_strict_loads(line) for line in lines)
    assert list(first)[:3] == ["stage", "step", "time"]
    assert first["stage"] == "sft" and first["step"] == 1 and isinstance(first["time"], float)
    assert first["loss"] == 0.5 and first["lr"] == 1e-5 and first["tokens"] == 7
    assert second["loss"] is None and second["kl"] is None  # NaN/inf -> null
    assert second["ok"] == 0.25
    assert read_metrics(tmp_path) == [first, second]


def test_numpy_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    with MetricsLogger(tmp_path, enabled=True) as ml:
        ml.log("sft", 1, {"a": np.int64(7), "b": np.float32(0.25), "c": np.float64("nan")})
    (record,) = read_metrics(tmp_path)
    assert (record["a"], record["b"], record["c"]) == (7, 0.25, None)


def test_file_path_and_append_across_instances(tmp_path):
    path = tmp_path / "sub" / "train.jsonl"
    MetricsLogger(path, enabled=True).log("sft", 1, {"loss": 1.0})
    logger = MetricsLogger(path, enabled=True)
    logger.log("sft", 2, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_disabled_and_non_rank0_write_nothing(tmp_path, monkeypatch):
    assert MetricsLogger(tmp_path, enabled=False).log("sft", 1, {"loss": 1.0}) is None
    monkeypatch.setenv("RANK", "1")
    ml = MetricsLogger(tmp_path)  # enabled defaults to is_rank0()
    assert ml.enabled is False
    ml.log("sft", 1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    assert MetricsLogger(tmp_path).enabled is True


def test_rejects_bad_metrics(tmp_path):
    ml = MetricsLogger(tmp_path, enabled=True)
    with pytest.raises(ValueError):
        ml.log("sft", 1, {"loss": torch.ones(3)})
    with pytest.raises(ValueError):
        ml.log("sft", 1, {"step": 3.0})
    with pytest.raises(TypeError):
        ml.log("sft", 1, {"loss": [1.0]})
    ml.close()


def test_summary_line(caplog):
    ml = MetricsLogger(None, enabled=True, summary_keys=("loss", "reward", "missing"))
    with caplog.at_level(logging.INFO, logger="fastmath_nemo.utils.metrics_logger"):
        record = ml.log("grpo", 3, {"loss": torch.tensor(0.123456), "reward": 12345.678, "kl": 0.1})
    assert record is not None and record["kl"] == 0.1
    assert caplog.messages == ["grpo step 3 | loss=0.1235 reward=1.235e+04"]


def test_default_summary_and_nan(caplog):
    ml = MetricsLogger(None, enabled=True)
    with caplog.at_level(logging.INFO, logger="fastmath_nemo.utils.metrics_logger"):
        ml.log("sft", 1, {"loss": float("nan"), "n": 4})
    assert caplog.messages == ["sft step 1 | loss=nan n=4"]


def test_torn_line_is_skipped_and_not_glued(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "sft", "step": 1, "time": 0.0, "loss": 1.0}\n{"stage": "sf')
    with MetricsLogger(path, enabled=True) as ml:
        ml.log("sft", 2, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path, strict=True)


def test_resume_supersedes_the_killed_runs_steps_after_the_checkpoint(tmp_path):
    """A run killed after logging steps 1-5 (checkpoint at 3) resumes at 3 and logs 4-6 again:
    readers see steps 1-6 once, 4 and 5 from the resumed run; the killed run's lines stay."""
    with MetricsLogger(tmp_path, enabled=True) as killed:
        killed.log("sft", 2, {"loss": 9.0})  # another stage's records are left alone
        for step in range(1, 6):
            killed.log("grpo", step, {"reward": float(step)})
    with MetricsLogger(tmp_path, enabled=True) as resumed:
        assert resumed.resume("sft", 2) == 0  # nothing of sft after step 2
        assert resumed.resume("grpo", 3) == 2
        for step in range(4, 7):
            resumed.log("grpo", step, {"reward": 10.0 * step})
    records = read_metrics(tmp_path)
    assert [(r["stage"], r["step"], r["reward"] if "reward" in r else r["loss"]) for r in records] == [
        ("sft", 2, 9.0), ("grpo", 1, 1.0), ("grpo", 2, 2.0), ("grpo", 3, 3.0),
        ("grpo", 4, 40.0), ("grpo", 5, 50.0), ("grpo", 6, 60.0)]
    raw = read_metrics(tmp_path, raw=True)
    assert len(raw) == 6 + 1 + 3  # every line as written, one marker
    (marker,) = [r for r in raw if r["stage"] == "resume"]
    assert (marker["step"], marker["resumed_stage"], marker["superseded"]) == (3, "grpo", 2)
    assert raw.index(marker) == 6  # after the killed run's lines, before the resumed run's


def test_resume_without_stale_records_writes_no_marker_and_the_stage_name_is_reserved(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as ml:
        assert ml.resume("grpo", 3) == 0  # no file yet
        ml.log("grpo", 3, {"reward": 1.0})
        assert ml.resume("grpo", 3) == 0  # a preemption saves the step it logged last
        with pytest.raises(ValueError, match="reserved"):
            ml.log("resume", 4, {"x": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path, raw=True)] == [3]
    assert MetricsLogger(tmp_path, enabled=False).resume("grpo", 1) == 0  # other ranks never write
    assert len(read_metrics(tmp_path, raw=True)) == 1
