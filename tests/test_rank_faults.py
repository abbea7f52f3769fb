"""Faults across ranks, under torchrun, on both backends.

- A NaN loss on one rank stops every rank at that step, each naming the rank and the step.
- One rank SIGKILLed in the middle of a step (for megatron: while an asynchronous checkpoint is
  being written): the other rank exits non-zero within ``run.distributed_timeout_s``, nothing
  the run started outlives it (megatron-core's checkpoint writer starts a multiprocessing
  Manager), and ``resume=true`` ends where the uninterrupted run ends.

Each rank runs under a torchrun of its own (two "nodes", static rendezvous), as on a cluster
where a node dies: no agent sees both ranks, so the survivor must find out by itself. The runs a
test compares differ only by the kill (one thread each, the same launcher and settings).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from _cli import free_port
from _sigkill import MARKER_ENV, assert_none_left, processes_started_with
from safetensors.torch import load_file

from fastmath_nemo.checkpoint.atomic import TMP_PREFIX, list_checkpoints

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_rank_faults_worker.py"
# 96 problems, 16 rows a step: 8 rows per rank, one micro-batch each; 6 steps an epoch.
SFT = ["conf=sft", "data.synthetic.n_train=96", "data.synthetic.n_eval=8", "data.synthetic.n_ops=1",
       "sft.rows_per_step=16", "policy.micro_batch_rows=8", "policy.device=cpu", "sft.optimizer.warmup_ratio=0.0"]
TIMEOUT_S = 30  # run.distributed_timeout_s in these runs
BACKENDS = [pytest.param("torch"), pytest.param("megatron", marks=pytest.mark.megatron)]


def _needs(backend: str) -> None:
    if backend == "megatron" and importlib.util.find_spec("megatron.core") is None:
        pytest.skip("needs megatron-core")


def _env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", MARKER_ENV: marker})  # every process of the run carries the marker
    return env


def _start_nodes(script: list[str], args: list[str], env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    """Two torchrun agents of one worker each ("nodes" 0 and 1), output to ``logs/node<i>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port, *script, *args]
        with open(logs / f"node{node}.log", "wb") as log:
            nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return nodes


def _wait(nodes: list[subprocess.Popen], logs: Path, timeout: float = 600) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()


def _tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))


def _sft_run(run_dir: Path, backend: str, *extra: str, marker: str = "") -> None:
    logs = run_dir.parent / f"{run_dir.name}-logs"
    nodes = _start_nodes([str(ROOT / "launch" / "run.py")], [f"run.dir={run_dir}", f"policy.backend={backend}", *SFT,
                                                               *extra], _env(marker or uuid.uuid4().hex), logs)
    assert _wait(nodes, logs) == [0, 0], _tail(logs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_loss_on_one_rank_stops_every_rank_naming_the_rank_and_step(tmp_path: Path, backend: str) -> None:
    _needs(backend)
    out = tmp_path / "out"
    out.mkdir()
    nodes = _start_nodes([str(WORKER), "1", "3", str(out)],
                         [f"run.dir={tmp_path / 'run'}", f"policy.backend={backend}", *SFT, "sft.epochs=1"],
                         _env(uuid.uuid4().hex), tmp_path / "logs")
    codes = _wait(nodes, tmp_path / "logs")
    assert all(code != 0 for code in codes), _tail(tmp_path / "logs")
    for rank in range(2):
        raised = json.loads((out / f"rank{rank}.json").read_text())
        assert raised["type"] == "NonFiniteLossError", raised
        assert raised["message"].startswith("sft step 3: non-finite loss on rank 1 of 2"), raised
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # nothing logged for the step that failed


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_killed_mid_step_stops_the_other_and_resume_ends_where_the_uninterrupted_run_ends(
        tmp_path: Path, backend: str) -> None:
    _needs(backend)
    # 18 steps with a checkpoint after each; megatron's written in the background, so the kill
    # lands while one is being written (megatron-core's writer processes and Manager are up).
    longer = ["sft.epochs=3", "sft.save_every_steps=1", "sft.keep_last_checkpoints=2",
              f"run.distributed_timeout_s={TIMEOUT_S}", *(["checkpoint.async_save=true"] if backend == "megatron" else [])]
    _sft_run(tmp_path / "reference", backend, *longer)

    run_dir, logs, marker = tmp_path / "killed", tmp_path / "killed-logs", uuid.uuid4().hex
    nodes = _start_nodes([str(ROOT / "launch" / "run.py")],
                         [f"run.dir={run_dir}", f"policy.backend={backend}", *SFT, *longer], _env(marker), logs)
    checkpoints = run_dir / "sft" / "checkpoints"
    deadline = time.monotonic() + 300
    while True:  # a complete checkpoint of step >= 3 and, for megatron, the next one being written
        assert all(node.poll() is None for node in nodes), _tail(logs)
        assert time.monotonic() < deadline, "no checkpoint step_3 within 300 s"
        done = [step for step, _ in list_checkpoints(checkpoints)] if checkpoints.is_dir() else []
        writing = checkpoints.is_dir() and any(p.name.startswith(TMP_PREFIX) for p in checkpoints.iterdir())
        if done and max(done) >= 3 and (backend != "megatron" or writing):
            break
        time.sleep(0.005)
    trainer = psutil.Process(nodes[1].pid).children()[0]  # rank 1's worker
    started = {p.pid for p in processes_started_with(marker)} - {nodes[0].pid, nodes[1].pid}
    trainer.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert nodes[0].wait(timeout=TIMEOUT_S + 30) != 0, _tail(logs)
    assert time.monotonic() - killed_at <= TIMEOUT_S, f"rank 0 took {time.monotonic() - killed_at:.0f} s"
    assert nodes[1].wait(timeout=60) != 0
    assert_none_left(marker)
    if backend == "megatron":  # the run did start helper processes, which are now gone
        assert started, "no checkpoint writer process was running at the kill: the test checked nothing"

    last_step = list_checkpoints(checkpoints)[-1][0]
    assert 3 <= last_step < 18
    before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    _sft_run(run_dir, backend, *longer, "resume=true")
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[before:]]
    assert [r["step"] for r in resumed if r["stage"] == "sft"] == list(range(last_step + 1, 19))
    ours = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    reference = load_file(str(tmp_path / "reference" / "sft" / "final" / "model.safetensors"))
    assert ours.keys() == reference.keys()
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) <= 1e-6
