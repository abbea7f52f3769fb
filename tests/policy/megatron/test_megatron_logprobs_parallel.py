"""At TP=2 on two CPU ranks (torchrun, gloo), with and without sequence parallelism: chunked
vocab-parallel logprobs and every parameter shard's gradient equal the whole-row logits
path within 1e-6 (fp32), and the reference policy's host snapshot gives the initial
logprobs after a step and puts the training weights back bit for bit."""

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

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import tiny_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).resolve().parent / "_logprobs_worker.py"


@pytest.mark.parametrize(("model", "flags"), [("qwen2", ()), ("qwen3", ("--sequence-parallel",))],
                         ids=["tp2-qwen2", "tp2-sequence-parallel-qwen3-tied"])
def test_chunked_logprobs_gradients_and_reference_at_tp2(tmp_path: Path, model: str, flags) -> None:
    folder, out = tmp_path / "model", tmp_path / "result.json"
    tiny_hf_model(model).save_pretrained(str(folder))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), "--model", model, "--folder", str(folder), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    cases = json.loads(out.read_text())["cases"]
    assert sorted(c["rank"] for c in cases) == [0, 1]
    for case in cases:
        assert case["logprob_diff"] <= 1e-6, case
        assert case["grad_diff"] <= 1e-6, case
        assert case["output_grad_max"] > 1e-3, case  # this rank's vocabulary shard has a gradient
        assert case["moved"] > 1e-3, case  # the step changed the logprobs ...
        assert case["reference_diff"] == 0.0, case  # ... the reference's are the initial ones
        assert case["restored"], case
