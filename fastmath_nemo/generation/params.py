"""SamplingParams from the configuration, shared by the GRPO loop and evaluation (neither
imports the other)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.config.schema import GenerationConfig
from fastmath_nemo.generation.base import SamplingParams


def stop_sequences(tokenizer: PreTrainedTokenizerBase, stops: list[str]) -> tuple[tuple[int, ...], ...]:
    """Token-id spellings of stop strings (``</think>`` is one token in R1-style tokenizers)."""
    return tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in stops)


def sampling_params(tokenizer: PreTrainedTokenizerBase, gen: GenerationConfig, n: int, max_tokens: int,
                    temperature: float, top_p: float, min_p: float, seed: int | None) -> SamplingParams:
    """``n`` samples per prompt of at most ``max_tokens`` tokens, ending at EOS or one of
    ``gen.stop`` (kept in the completion)."""
    return SamplingParams(
        n=n, temperature=temperature, top_p=top_p, min_p=min_p, max_tokens=max_tokens,
        stop_token_ids=(int(tokenizer.eos_token_id),), stop_sequences=stop_sequences(tokenizer, gen.stop), seed=seed,
    )
