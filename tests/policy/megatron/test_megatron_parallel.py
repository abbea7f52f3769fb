"""Two CPU ranks under torchrun (gloo): TP=2 and PP=2 logits match HF; weights gather back exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import free_port

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.megatron
ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).resolve().parent / "_parallel_worker.py"
TOL = 1e-5



def _run_worker(tmp_path: Path, tp: int, pp: int) -> list[dict]:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), "--tp", str(tp), "--pp", str(pp), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())["cases"]


def test_tensor_parallel_2(tmp_path: Path) -> None:
    cases = _run_worker(tmp_path, tp=2, pp=1)
    assert len(cases) == 6  # 3 models x 2 ranks
    for case in cases:
        assert case["logits_diff"] < TOL, case
        assert case["packed_diff"] < TOL, case
        assert case["gather_exact"], case


def test_pipeline_parallel_2(tmp_path: Path) -> None:
    """Forward through get_forward_backward_func(forward_only=True); the last stage checks logits."""
    cases = _run_worker(tmp_path, tp=1, pp=2)
    last = [c for c in cases if c["rank"] == 1]
    assert len(last) == 3 and all(c["logits_diff"] is None for c in cases if c["rank"] == 0)
    for case in last:
        assert case["logits_diff"] < TOL, case
        assert case["packed_diff"] < TOL, case
    assert all(c["gather_exact"] for c in cases), cases
