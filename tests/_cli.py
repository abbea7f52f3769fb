"""Test helpers for runs of launch/run.py in subprocesses (plain and under torchrun)."""

from __future__ import annotations

import socket

# The recipe at its smallest: 64 problems, 2 SFT epochs of 8 steps, 2 GRPO steps, evaluation on
# 8 problems x 2 samples, a 2-layer 64-wide model whose heads split over 2 tensor-parallel ranks.
TINY_RECIPE = [
    "data.synthetic.n_train=64", "data.synthetic.n_eval=8", "sft.epochs=2", "sft.rows_per_step=8",
    "policy.micro_batch_rows=2", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2",
    "generation.max_tokens=24", "eval.token_budgets=[24]", "eval.n_samples=2", "eval.k_values=[2]",
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=2", "model.tiny.intermediate_size=128", "policy.device=cpu",
]


def free_port() -> int:
    """A free local TCP port (for torchrun's --master-port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
