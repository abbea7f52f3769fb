"""The Generator seam: anything that turns prompt token ids into sampled completions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, with vLLM's meanings. ``stop_token_ids`` (e.g. EOS) and
    ``stop_sequences`` (token-id spellings of stop strings such as ``</think>``) end a
    completion and are kept in it, so the policy learns to emit them."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    seed: int | None = None


@dataclass
class Rollouts:
    """Completions for P prompts x n samples, flattened prompt-major (row = p * n + j).

    prompt_index[i]:  which prompt row i answers
    token_ids[i]:     the completion's ids, stop token included, prompt excluded
    logprobs[i]:      per-token logprobs of token_ids[i] under the trainer's distribution,
                      ``log softmax(logits / temperature)``: temperature only, no min-p/top-p
                      truncation (greedy: untempered). Tokens are *drawn* from the truncated,
                      renormalised distribution, but its logprobs (vLLM's processed_logprobs,
                      higher by -log(kept mass) per token) are not reported: the GRPO loss
                      needs none, and the mismatch metric and TIS compare these with the
                      trainer's logprobs, which they equal up to the engines' numerics.
    finish_reasons[i]: "stop" (hit a stop token or EOS) or "length" (hit max_tokens); in
                      abandoned rollouts, "abandoned" for the rows cut short
    abandoned:        the generator stopped early for a stop request (preemption): the rows
                      are incomplete and must not be used
    """

    prompt_index: list[int] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    abandoned: bool = False

    def __len__(self) -> int:
        return len(self.token_ids)


class RolloutsAbandoned(Exception):
    """Work that needed rollouts (an evaluation) stopped because they were abandoned for a stop
    request: nothing of it is recorded, and a resumed run does it again."""


# Decoding steps between two looks at a stop request (``checkpoint.preemption``): a rollout of
# 16k tokens is abandoned within this many steps of the request, not finished.
STOP_CHECK_STEPS = 16


class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress: str | None = None) -> Rollouts:
        """Sample ``params.n`` completions for every prompt. ``progress``: the label of a
        progress bar over the completions (tqdm, on stderr); None shows none. A stop request
        (``checkpoint.preemption.stop_requested_here``) ends the work within
        :data:`STOP_CHECK_STEPS` decoding steps, with ``Rollouts.abandoned`` set."""
        ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new policy weights (Hugging Face names), e.g. after an optimizer step."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory while the trainer runs (no-op where unsupported)."""
        ...

    def wake(self) -> None:
        ...

    def close(self) -> None:
        """Free what the generator holds (an engine's KV cache and weights)."""
        ...
