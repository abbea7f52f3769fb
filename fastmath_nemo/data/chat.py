"""Chat formatting through the tokenizer's own chat template.

The prompt is always rendered with ``add_generation_prompt=True``, exactly as at generation
time, and an SFT example is the full conversation whose prompt part is that same token prefix.
So SFT trains on the token context the model sees in GRPO and evaluation.

transformers 5: ``apply_chat_template`` returns a ``BatchEncoding`` by default; we pass
``tokenize=True, return_dict=False`` to get a plain ``list[int]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

__all__ = ["ChatTemplateError", "messages_for", "prompt_ids", "sft_example"]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot produce aligned prompt / SFT sequences."""


def messages_for(
    problem: str, system_prompt: str | None = None, reply: str | None = None
) -> list[dict[str, str]]:
    """``[system?, user, assistant?]`` messages for one problem."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": problem})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return messages


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    system_prompt: str | None = None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of ``[system?, user]`` followed by the generation prompt (assistant header).

    template_kwargs: extra variables for the template (e.g. ``{"enable_thinking": False}``).
    """
    return _render_ids(tokenizer, messages_for(problem, system_prompt), True, template_kwargs)


def sft_example(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    trace: str,
    system_prompt: str | None = None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """``(ids, target_mask)`` for one SFT conversation ``[system?, user, assistant=trace]``.

    ``ids`` is the full rendered conversation; its first ``len(prompt_ids(...))`` tokens are
    exactly ``prompt_ids(...)``. ``target_mask[t] = 1`` on the assistant reply: the trace
    tokens and the end-of-turn special token after them (e.g. ``<|im_end|>``), so the model
    learns to stop. It is 0 on system / user / generation-prompt tokens and on template
    formatting after the end-of-turn token (ChatML's trailing ``"\\n"``), which generation never
    produces because it stops at the end-of-turn token.

    Raises ``ChatTemplateError`` when the template does not render the prompt as a prefix of
    the conversation, or drops / rewrites the trace (e.g. templates that strip the text before
    ``</think>`` from assistant turns).
    """
    prompt_messages = messages_for(problem, system_prompt)
    full_messages = messages_for(problem, system_prompt, reply=trace)

    prompt_text = _render_text(tokenizer, prompt_messages, True, template_kwargs)
    full_text = _render_text(tokenizer, full_messages, False, template_kwargs)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "chat template problem: the prompt rendered with add_generation_prompt=True is not a "
            "prefix of the conversation rendered with the assistant reply; SFT would train on a "
            f"context generation never sees.\n  prompt ends: {prompt_text[-80:]!r}\n"
            f"  conversation there: {full_text[max(0, len(prompt_text) - 80) : len(prompt_text)]!r}"
        )
    if trace not in full_text[len(prompt_text) :]:
        raise ChatTemplateError(
            "chat template problem: the rendered assistant turn does not contain the trace "
            "verbatim (does the template rewrite assistant content, e.g. drop text before "
            "'</think>'?); SFT would not train on the trace."
        )

    prompt = _render_ids(tokenizer, prompt_messages, True, template_kwargs)
    ids = _render_ids(tokenizer, full_messages, False, template_kwargs)
    if ids[: len(prompt)] != prompt:
        raise ChatTemplateError(
            "chat template problem: the prompt token ids are not a prefix of the conversation "
            "token ids (the tokenizer merges tokens across the end of the generation prompt, "
            f"e.g. a trace starting with whitespace); prompt tail ids {prompt[-5:]}, "
            f"conversation ids there {ids[max(0, len(prompt) - 5) : len(prompt)]}"
        )

    reply = ids[len(prompt) :]
    n_targets = len(reply)
    special = _special_ids(tokenizer)
    last_special = max((i for i, tok in enumerate(reply) if tok in special), default=None)
    if last_special is not None:
        n_targets = last_special + 1  # through the end-of-turn token, not the formatting after it
    target_mask = [0] * len(prompt) + [1] * n_targets + [0] * (len(reply) - n_targets)
    return ids, target_mask


def _render_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    template_kwargs: Mapping[str, Any] | None,
) -> str:
    _require_template(tokenizer)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
    )
    if not isinstance(text, str):  # pragma: no cover - guards against API changes
        raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _render_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    template_kwargs: Mapping[str, Any] | None,
) -> list[int]:
    _require_template(tokenizer)
    ids = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=add_generation_prompt,
        **(template_kwargs or {}),
    )
    if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        raise ChatTemplateError(f"apply_chat_template returned {type(ids).__name__}, expected list[int]")
    return cast(list[int], ids)


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat_template set")


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of all special tokens, including added tokens flagged special (e.g. ``<|im_end|>``)."""
    special = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    return special
