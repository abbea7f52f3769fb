"""Failure handling.

- A NaN loss in the middle of SFT stops the run with ``NonFiniteLossError`` before any
  optimizer step; the checkpoint written before it stays intact, loadable, and resumable.
- Bad command-line overrides exit with code 2, name the key, and start no work (no run dir).
- ``data.source=files`` with a malformed JSONL line fails naming the file and line; with
  ``data.skip_bad_rows=true`` the run goes on and the log gives the skipped count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fastmath_nemo.algorithms.sft as sft_module  # noqa: E402
from fastmath_nemo.algorithms.sft import run_sft, tokenize_sft  # noqa: E402
from fastmath_nemo.batching.micro_batches import MicroBatching  # noqa: E402
from fastmath_nemo.checkpoint.atomic import is_complete, list_checkpoints  # noqa: E402
from fastmath_nemo.checkpoint.manager import CheckpointManager  # noqa: E402
from fastmath_nemo.config.schema import OptimizerConfig, SFTConfig  # noqa: E402
from fastmath_nemo.data.loading import DataError  # noqa: E402
from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits  # noqa: E402
from fastmath_nemo.data.tokenizer import build_task_tokenizer, train_tokenizer  # noqa: E402
from fastmath_nemo.pipeline import run_stage  # noqa: E402
from fastmath_nemo.policy.models import TinyModelConfig, build_tiny_model, load_pretrained  # noqa: E402
from fastmath_nemo.policy.optimization import NonFiniteLossError  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402
from fastmath_nemo.preflight import load_config  # noqa: E402
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics  # noqa: E402

RUN_PY = ROOT / "launch" / "run.py"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
MODEL_CFG = TinyModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=128, max_position_embeddings=512)


# Tiny tensors gain nothing from threads (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return env


def file_digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- NaN loss mid-SFT ------------------------------------------------------------------------------
class RecordingCheckpoints(CheckpointManager):
    """Remembers the file digests of every checkpoint right after it was written."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.written: dict[int, dict[str, str]] = {}

    def save(self, policy, step, state):  # type: ignore[override]
        target = super().save(policy, step, state)
        self.written[step] = file_digests(target)
        return target


def test_nan_loss_mid_sft_stops_run_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    train, _ = generate_splits(SyntheticTaskConfig(seed=3, n_train=24, n_eval=2, max_checks=2))
    tokenizer = train_tokenizer([f"{SYSTEM_PROMPT}\n{r.problem}\n{r.trace}" for r in train], vocab_size=300)
    data = tokenize_sft(train, tokenizer, SYSTEM_PROMPT, 512)
    # 24 examples / 8 rows = 3 steps per epoch, 6 in all; checkpoints at steps 2 and 4.
    cfg = SFTConfig(epochs=2, rows_per_step=8, max_seq_len=512, packing=False, save_every_steps=2,
                    keep_last_checkpoints=2, optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.2))
    nan_step = 5
    micro_batch_rows = 4  # two micro-batches per step; the NaN comes in the second one

    real_loss = sft_module.sft_loss
    calls = {"n": 0}

    def nan_at_step(logprobs, batch, totals=None):
        calls["n"] += 1
        loss, metrics = real_loss(logprobs, batch, totals=totals)
        if calls["n"] == 2 * nan_step:  # second micro-batch of step 5
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(sft_module, "sft_loss", nan_at_step)
    stage = tmp_path / "sft"
    policy = TorchPolicy(build_tiny_model(MODEL_CFG, tokenizer, seed=1), torch.device("cpu"),
                         micro_batching=MicroBatching(rows=micro_batch_rows))
    checkpoints = RecordingCheckpoints(stage, tokenizer, cfg.keep_last_checkpoints)
    with MetricsLogger(stage / "metrics.jsonl") as metrics:
        with pytest.raises(NonFiniteLossError) as excinfo:
            run_sft(policy, data, cfg, checkpoints, metrics, seed=5)
    message = str(excinfo.value)
    assert message.startswith("sft step 5: non-finite loss on rank 0 of 1") and "nan" in message.lower(), message

    # The run stopped at the NaN: steps 1-4 logged, nothing for step 5, no final model.
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (stage / "final").exists()
    leftovers = [p.name for p in (stage / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temp directories left behind: {leftovers}"

    # The last checkpoint (step 4) is complete and byte-for-byte what was written.
    assert [s for s, _ in list_checkpoints(stage / "checkpoints")] == [2, 4]
    last = stage / "checkpoints" / "step_4"
    assert is_complete(last)
    assert file_digests(last) == checkpoints.written[4]

    # No optimizer step was taken with the NaN: the live weights still equal step 4's, and are finite.
    saved = load_file(str(last / "model.safetensors"))
    live = policy.model.state_dict()
    for name, tensor in saved.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(live[name], tensor), f"{name} changed after the NaN step"
    assert all(p.grad is None for p in policy.model.parameters()), "NaN gradients left in .grad"

    # Loadable by a fresh process-equivalent policy, and training resumes from it to the end.
    monkeypatch.setattr(sft_module, "sft_loss", real_loss)
    fresh = TorchPolicy(load_pretrained(last), torch.device("cpu"))
    fresh.setup_optimizer(cfg.optimizer, 6)
    assert fresh.load(last)["step"] == 4
    resumed = TorchPolicy(build_tiny_model(MODEL_CFG, tokenizer, seed=99), torch.device("cpu"),
                          micro_batching=MicroBatching(rows=micro_batch_rows))
    with MetricsLogger(stage / "metrics.jsonl") as metrics:
        run_sft(resumed, data, cfg, CheckpointManager(stage, tokenizer, 2), metrics, seed=5, resume=True)
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")][4:] == [5, 6]
    assert is_complete(stage / "final")


# -- bad overrides -----------------------------------------------------------------------------------
BAD_OVERRIDES = [
    ("sft.epochs=abc", "sft.epochs"),
    ("policy.backend=jax", "policy.backend"),
    ("grpo.num_generations=1", "grpo.num_generations"),
    ("model.path=/nonexistent/model", "model.path"),  # a missing folder, not a hub id to fetch
    ("sft.init_from=runs/none/sft/final", "sft.init_from"),
]


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("fastmath_launch_run_under_test", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("override,key", BAD_OVERRIDES, ids=[k for _, k in BAD_OVERRIDES])
def test_bad_override_exits_2_naming_key_and_starts_nothing(tmp_path: Path, capsys, launcher, override: str,
                                                           key: str) -> None:
    run_dir = tmp_path / "run"
    rc = launcher.main(["conf=sft", override, f"run.dir={run_dir}", "data.synthetic.n_train=8"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("error: ")
    assert f"'{key}'" in captured.err, captured.err
    assert not run_dir.exists(), "a run directory was created for an invalid configuration"


@pytest.mark.slow
def test_bad_override_cli_process_exit_code(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "conf=sft", "sft.epochs=abc", f"run.dir={run_dir}"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sft.epochs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


# -- malformed data files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete local model folder: task tokenizer (with chat template) + tiny random model."""
    out = tmp_path_factory.mktemp("tiny_model")
    train, _ = generate_splits(SyntheticTaskConfig(seed=4, n_train=32, n_eval=2, max_checks=2))
    tokenizer = build_task_tokenizer([f"{SYSTEM_PROMPT}\n{r.problem}\n{r.trace}" for r in train], out,
                                     vocab_size=300)
    build_tiny_model(MODEL_CFG, tokenizer, seed=0).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture()
def eval_jsonl(tmp_path: Path) -> Path:
    rows = [json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(4)]
    rows.insert(2, '{"problem": "What is 9 + 1?", "answer": ')  # line 3: cut off mid-object
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def eval_overrides(run_dir: Path, eval_path: Path, model_dir: Path) -> list[str]:
    return [
        "data.source=files", f"data.eval_path={eval_path}", f"eval.checkpoint={model_dir}", f"run.dir={run_dir}",
        "eval.token_budgets=[16]", "eval.n_samples=2", "eval.k_values=[2]", "policy.device=cpu",
        # what the (unused here) embedded base model would be built with: keep it tiny
        "model.tiny.hidden_size=64", "model.tiny.num_layers=1", "model.tiny.num_attention_heads=2",
        "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128",
    ]


@pytest.mark.slow
def test_malformed_jsonl_line_fails_naming_file_and_line(tmp_path: Path, eval_jsonl: Path,
                                                         tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), "conf=eval", *eval_overrides(run_dir, eval_jsonl, tiny_model_dir)],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    last_line = proc.stderr.strip().splitlines()[-1]
    assert f"{eval_jsonl}:3:" in last_line, proc.stderr[-2000:]
    assert "malformed JSON" in last_line
    assert "skip_bad_rows" in last_line  # says how to get past it
    assert not (run_dir / "eval").exists() and not (run_dir / "report.json").exists()


def test_malformed_jsonl_line_in_process_raises_data_error(tmp_path: Path, eval_jsonl: Path,
                                                           tiny_model_dir: Path) -> None:
    cfg = load_config("eval", eval_overrides(tmp_path / "run", eval_jsonl, tiny_model_dir))
    with pytest.raises(DataError, match=rf"{eval_jsonl}:3: malformed JSON"):
        run_stage(cfg)


def test_skip_bad_rows_runs_and_logs_skipped_count(tmp_path: Path, eval_jsonl: Path, tiny_model_dir: Path,
                                                   caplog) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config("eval", [*eval_overrides(run_dir, eval_jsonl, tiny_model_dir), "data.skip_bad_rows=true"])
    with caplog.at_level(logging.INFO):
        out = run_stage(cfg)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "fastmath_nemo.data.loading" and r.levelno == logging.WARNING]
    assert any("skipped 1 bad row(s) of 5 read" in w and f"{eval_jsonl}:3" in w for w in warnings), warnings

    rows = out["evaluations"]
    assert [(r.model, r.token_budget) for r in rows] == [("model", 16)]
    assert rows[0].metrics["n_problems"] == 4  # the 4 good rows, the bad one skipped
    report = json.loads((run_dir / "report.json").read_text())
    assert report["evaluations"][0]["n_problems"] == 4
    assert (run_dir / "eval" / "model@16.json").is_file()
