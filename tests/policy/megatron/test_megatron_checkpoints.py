"""The megatron policy's training checkpoints at the paper's layout in miniature (TP=2 x DP=2,
distributed optimizer, sequence parallelism, four CPU ranks): every rank writes its own shards
(no gathered copy of the model), synchronously or in the background while training goes on,
a resumed run continues bit for bit, and the checkpoint's weights load at TP=1."""

from __future__ import annotations

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
WORKER = Path(__file__).resolve().parent / "_checkpoint_worker.py"


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_tp2_dp2_checkpoint_resumes_bit_exactly_and_loads_at_tp1(tmp_path: Path, asynchronous: bool) -> None:
    import torch

    from fastmath_nemo.config.schema import MegatronConfig
    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    folder, ckpt = tmp_path / "hf", tmp_path / "step_2"
    tiny_hf_model("qwen2").save_pretrained(str(folder))
    _torchrun("train", "--folder", str(folder), "--ckpt", str(ckpt), "--out", str(tmp_path / "trained.pt"),
              *(["--async"] if asynchronous else []))
    assert (ckpt / "megatron" / "metadata.json").is_file()  # megatron-core's last word on a complete save
    assert not list(ckpt.glob("*.safetensors"))  # no rank gathered the model
    shards = list((ckpt / "megatron").glob("*.distcp"))
    assert len(shards) >= 4  # every rank wrote its part (two files each)
    _torchrun("resume", "--folder", str(folder), "--ckpt", str(ckpt), "--out", str(tmp_path / "resumed.pt"))

    trained, resumed = torch.load(tmp_path / "trained.pt"), torch.load(tmp_path / "resumed.pt")
    assert sorted(trained) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):  # the resumed steps are the uninterrupted run's, bit for bit
        for name, tensor in trained[step].items():
            assert torch.equal(resumed[step][name], tensor), (step, name)
    assert any(not torch.equal(trained[4][n], trained[2][n]) for n in trained[2])  # steps 3, 4 moved the weights

    try:  # one process, TP=1: megatron-core reshards the TP=2 shards on load
        at_tp1 = MegatronPolicy(ckpt, MegatronConfig(attention_backend="sdpa"), temperature=0.7)
        loaded = dict(at_tp1.export_weights())
    finally:
        destroy_model_parallel()
    assert loaded.keys() == trained[2].keys()
    for name, tensor in trained[2].items():
        assert torch.equal(loaded[name], tensor), name
