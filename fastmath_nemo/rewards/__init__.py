"""Rewards for GRPO: answer extraction, bounded math verification, group-aware reward functions.

Exports are lazy so verifier worker processes (which import this package) load neither
torch nor the reward registry.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "last_boxed_answer": "extract",
    "think_section": "extract",
    "verify_answer": "verify",
    "verify_many": "verify",
    "configure_verifier": "verify",
    "shutdown_verifier": "verify",
    "VerifierUnavailableError": "verify",
    "completion_lengths": "functions",
    "accuracy_reward": "functions",
    "format_reward": "functions",
    "cosine_reward": "functions",
    "kimi_length_reward": "functions",
    "repetition_penalty_reward": "functions",
    "dapo_overlong_reward": "length_methods",
    "shorterbetter_reward": "length_methods",
    "laser_d_reward": "length_methods",
    "lcpo_exact_reward": "length_methods",
    "lcpo_max_reward": "length_methods",
    "REWARD_FUNCTIONS": "functions",
    "get_reward_fn": "functions",
    "compute_rewards": "functions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
