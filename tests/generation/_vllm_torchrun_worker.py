"""Worker for test_vllm_torchrun.py, run by ``torch.distributed.run --nproc-per-node N``.

Usage: ``_vllm_torchrun_worker.py --folder MODEL --records R.json --out DIR --backend megatron|torch
--tp T --engine-tp E --steps S``. Every rank builds the policy (megatron at TP=T, or the torch
policy, data-parallel), then its vLLM engine (blocks of E consecutive ranks, external_launcher),
and runs the real GRPO loop (rollouts from the engines, refit after every step). Each rank
writes ``DIR/rank<r>.json``: whether engine creation left the global RNG untouched, every
generate call's prompts and rollouts, and a collective over the trainer's group after the
engine was closed. Rank 0's metrics land in ``DIR/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from fastmath_nemo.algorithms.grpo import run_grpo  # noqa: E402
from fastmath_nemo.batching.micro_batches import MicroBatching  # noqa: E402
from fastmath_nemo.checkpoint.manager import CheckpointManager  # noqa: E402
from fastmath_nemo.config.schema import GenerationConfig, GRPOConfig, MegatronConfig, OptimizerConfig, VLLMConfig  # noqa: E402
from fastmath_nemo.data.records import MathRecord  # noqa: E402
from fastmath_nemo.generation.vllm_generator import VLLMGenerator  # noqa: E402
from fastmath_nemo.utils.distributed import data_parallel_rank, init_distributed_if_needed, rank  # noqa: E402
from fastmath_nemo.utils.metrics_logger import MetricsLogger  # noqa: E402

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# Untruncated sampling (the engine's logprobs are then the trainer's); digits stop a completion,
# so lengths vary, the length rewards differ within a group and the policy really trains.
GEN = GenerationConfig(max_tokens=12, top_p=1.0, min_p=0.0, stop=[str(d) for d in range(10)])


def grpo_config(steps: int, prompts_per_step: int) -> GRPOConfig:
    """Shared with the single-process replay in the test."""
    return GRPOConfig(steps=steps, prompts_per_step=prompts_per_step, num_generations=4, beta=0.0, mismatch_every_steps=1,
                      optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0))


def _record(prompt_ids, out) -> dict:
    return {"prompts": prompt_ids, "prompt_index": out.prompt_index, "token_ids": out.token_ids,
            "logprobs": out.logprobs, "finish_reasons": out.finish_reasons}


class Recording:
    """The engine, with every generate call's prompts and rollouts kept for the test: what this
    rank received (``calls``) and what its own engine generated (``engine_calls``)."""

    def __init__(self, engine: VLLMGenerator) -> None:
        self.engine, self.calls, self.engine_calls = engine, [], []
        engine_generate = engine._generate

        def recorded(prompt_ids, params, keys, progress):
            out = engine_generate(prompt_ids, params, keys, progress)
            self.engine_calls.append(_record(prompt_ids, out))
            return out

        engine._generate = recorded

    def generate(self, prompt_ids, params, progress=None):
        out = self.engine.generate(prompt_ids, params, progress)
        self.calls.append(_record(prompt_ids, out))
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--folder", "--records", "--out", "--backend"):
        ap.add_argument(flag, required=True)
    for flag in ("--tp", "--engine-tp", "--steps", "--prompts-per-step"):
        ap.add_argument(flag, type=int, required=True)
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    if args.backend == "megatron":
        from fastmath_nemo.policy.megatron.policy import MegatronPolicy

        policy = MegatronPolicy(args.folder, MegatronConfig(tensor_parallel_size=args.tp), seed=0,
                                micro_batching=MicroBatching(rows=4))
    else:
        from fastmath_nemo.policy.models import load_pretrained
        from fastmath_nemo.policy.torch_policy import TorchPolicy

        init_distributed_if_needed("cpu")
        policy = TorchPolicy(load_pretrained(args.folder), torch.device("cpu"), micro_batching=MicroBatching(rows=4))
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    records = [MathRecord(**r) for r in json.loads(Path(args.records).read_text())]

    before = torch.get_rng_state()
    engine = VLLMGenerator(args.folder, VLLMConfig(max_model_len=256, cpu_kvcache_gb=1), seed=0,
                           tensor_parallel_size=args.engine_tp)
    rng_unchanged = torch.equal(before, torch.get_rng_state())
    recording = Recording(engine)
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=rank() == 0)
    run_grpo(policy, recording, tokenizer, records, grpo_config(args.steps, args.prompts_per_step), GEN,
             SYSTEM_PROMPT, CheckpointManager(out / "grpo", tokenizer), metrics, seed=0)
    metrics.close()
    engine.close()
    # the trainer's default group still works once vLLM has torn its own groups down
    total = torch.tensor([rank() + 1.0])
    dist.all_reduce(total)
    result = {"rank": rank(), "dp_rank": data_parallel_rank(), "engine": engine.groups.engine,
              "rng_unchanged": rng_unchanged, "all_reduce_after_close": total.item(), "calls": recording.calls,
              "engine_calls": recording.engine_calls}
    (out / f"rank{rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
