"""The PyTorch backend under torchrun: two CPU ranks (gloo) train data-parallel, rank 0 logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import TINY_RECIPE, free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_train_and_log_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "launch" / "run.py"), f"run.dir={tmp_path}", *TINY_RECIPE]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft_steps = [r["step"] for r in records if r["stage"] == "sft"]
    # 64 examples / 8 rows per step = 8 steps per epoch, logged once each (rank 0 only).
    assert sft_steps == list(range(1, 17))
    assert [r["step"] for r in records if r["stage"] == "grpo"] == [1, 2]
    report = json.loads((tmp_path / "report.json").read_text())
    # Evaluation shards problems over the ranks and gathers every sample back.
    assert all(row["n_problems"] == 8 and row["n_samples"] == 2 for row in report["evaluations"])
    for row in report["evaluations"]:  # rank 0 writes both ranks' samples, and only once
        path = tmp_path / "eval" / f"{row['model']}@{row['token_budget']}.samples.jsonl"
        samples = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(s["problem_id"], s["sample"]) for s in samples] == [(p, j) for p in range(8) for j in range(2)]
    weights = load_file(str(tmp_path / "sft" / "final" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert any((weights[k] - base[k]).abs().max() > 0 for k in base)
