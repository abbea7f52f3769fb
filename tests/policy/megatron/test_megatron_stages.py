"""policy.backend=megatron through the CLI: the SFT stage follows the PyTorch backend's loss
curve step by step, and its final folder is a Hugging Face model the other stages load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
SMALL = ["conf=sft", "data.synthetic.n_train=96", "data.synthetic.n_eval=8", "data.synthetic.n_ops=1", "sft.epochs=1",
         "sft.rows_per_step=16", "policy.micro_batch_rows=8", "policy.device=cpu", "sft.optimizer.warmup_ratio=0.0"]


def _sft(run_dir: Path, backend: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), f"run.dir={run_dir}", f"policy.backend={backend}", *SMALL]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == "sft"]


def test_megatron_sft_follows_the_pytorch_backend(tmp_path: Path) -> None:
    # each run builds the embedded tiny model and tokenizer from the same seed: the same start
    torch_steps = _sft(tmp_path / "torch", "torch")
    megatron_steps = _sft(tmp_path / "megatron", "megatron")
    assert len(torch_steps) == len(megatron_steps) == 6
    for ours, theirs in zip(megatron_steps, torch_steps):
        assert ours["step"] == theirs["step"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4), (ours, theirs)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3), (ours, theirs)
    assert megatron_steps[-1]["loss"] < megatron_steps[0]["loss"]
    final = tmp_path / "megatron" / "sft" / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "megatron", "COMPLETE"):
        assert (final / name).exists(), name
