"""Chat formatting through the tokenizer's own chat template (or ``data.chat_template``).

The prompt is always rendered with ``add_generation_prompt=True``, exactly as at generation
time, and an SFT example is the full conversation whose prompt part is that same token prefix.
So SFT trains on the token context the model sees in GRPO and evaluation.

Reasoning models' templates often rewrite assistant turns (DeepSeek-R1-Distill's drops all text
before ``</think>``), so the rendered conversation no longer holds the trace. Then an SFT example
is built directly in the generation-time layout instead: ``prompt_ids(...)``, the trace's tokens
and the eos token that generation stops on (see :func:`sft_example`).

transformers 5: ``apply_chat_template`` returns a ``BatchEncoding`` by default; we pass
``tokenize=True, return_dict=False`` to get a plain ``list[int]``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

__all__ = ["ChatTemplateError", "check_chat_template", "messages_for", "prompt_ids", "resolve_chat_template",
           "sft_example"]

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot produce aligned prompt / SFT sequences."""


def resolve_chat_template(value: str) -> str:
    """The Jinja text that ``data.chat_template`` names: the value itself when it holds Jinja
    markup (``{{`` or ``{%``; a chat template without either would render constant text), else
    the contents of the file at that path (``~`` expanded, relative to the working directory).

    Raises ``ChatTemplateError`` when the value is not markup and no such file exists.
    """
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ChatTemplateError(
            f"{value!r} is neither a Jinja template (it has no '{{{{' or '{{%') nor an existing file"
        )
    return path.read_text(encoding="utf-8")


def check_chat_template(template: str) -> None:
    """Compile ``template`` the way ``apply_chat_template`` does (transformers' sandboxed Jinja
    environment with its filters), so a broken template fails at start-up, not mid-stage."""
    import jinja2
    from transformers.utils import chat_template_utils

    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    try:
        if compile_template is not None:
            compile_template(template)
        else:  # pragma: no cover - a transformers without the helper: syntax only
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ChatTemplateError(f"the Jinja template does not compile{line}: {e}") from e


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

    When the template rewrites assistant turns (the rendered conversation does not hold the
    trace verbatim after the earlier turns, e.g. DeepSeek-R1-Distill's drops the text before
    ``</think>``), the example is built in the generation-time layout instead:
    ``prompt_ids(...)`` + the trace's tokens + the tokenizer's eos token (generation stops on
    ``eos_token_id``), with targets on the trace and eos tokens; a note says so once per process.
    When the generation prompt already ends with the start of the trace (``<think>\\n``), that
    overlap is not repeated.

    Raises ``ChatTemplateError`` when a template that keeps the trace does not render the prompt
    as a (token) prefix of the conversation, or when a rewriting template's tokenizer has no eos
    token to end the turn.
    """
    prompt_messages = messages_for(problem, system_prompt)
    full_messages = messages_for(problem, system_prompt, reply=trace)

    prompt_text = _render_text(tokenizer, prompt_messages, True, template_kwargs)
    full_text = _render_text(tokenizer, full_messages, False, template_kwargs)
    history_text = _render_text(tokenizer, prompt_messages, False, template_kwargs)
    reply_start = len(os.path.commonprefix([history_text, full_text]))
    if trace not in full_text[reply_start:]:
        prompt = _render_ids(tokenizer, prompt_messages, True, template_kwargs)
        generation_prompt = prompt_text[len(os.path.commonprefix([history_text, prompt_text])) :]
        return _generation_layout_example(tokenizer, prompt, generation_prompt, trace)
    if not full_text.startswith(prompt_text):
        raise ChatTemplateError(
            "chat template problem: the prompt rendered with add_generation_prompt=True is not a "
            "prefix of the conversation rendered with the assistant reply; SFT would train on a "
            "context generation never sees (set data.chat_template to a template whose generation "
            "prompt starts its assistant turns)."
            f"\n  prompt ends: {prompt_text[-80:]!r}\n"
            f"  conversation there: {full_text[max(0, len(prompt_text) - 80) : len(prompt_text)]!r}"
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


def _generation_layout_example(
    tokenizer: PreTrainedTokenizerBase, prompt: list[int], generation_prompt: str, trace: str
) -> tuple[list[int], list[int]]:
    """``prompt + trace tokens + [eos]`` with targets on the trace and eos: exactly the tokens
    a generation from ``prompt`` would produce, whatever the template does to assistant turns."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ChatTemplateError(
            "chat template problem: the template rewrites assistant turns (the trace is not rendered "
            "verbatim), so SFT examples end with the eos token generation stops on, but "
            f"{type(tokenizer).__name__} has no eos_token"
        )
    _log_once(
        "the chat template rewrites assistant turns (the rendered conversation does not hold the trace "
        "verbatim, e.g. text before '</think>' is dropped): SFT examples are the prompt as rendered for "
        f"generation, then the trace's tokens, then the eos token {tokenizer.eos_token!r} (where "
        "generation stops); targets are the trace and eos tokens"
    )
    overlap = _leading_overlap(generation_prompt, trace)
    if overlap:
        # e.g. R1's generation prompt ends with "<think>\n" and so does the trace start: the model
        # continues after the prompt, so training it to write "<think>" again would be wrong.
        _log_once(f"the generation prompt already ends with {overlap!r}: SFT traces starting with it "
                  "continue after it instead of repeating it")
    reply = tokenizer.encode(trace[len(overlap) :], add_special_tokens=False) + [int(eos)]
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def _leading_overlap(generation_prompt: str, trace: str) -> str:
    """The longest start of ``trace`` that ``generation_prompt`` ends with, if it holds more
    than whitespace ("" otherwise: a shared newline is formatting, not content)."""
    for n in range(min(len(generation_prompt), len(trace)), 0, -1):
        if generation_prompt.endswith(trace[:n]) and trace[:n].strip():
            return trace[:n]
    return ""


@functools.cache
def _log_once(message: str) -> None:
    """Log ``message`` at INFO the first time it is seen in this process (not per example)."""
    logger.info(message)


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
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat_template set (set data.chat_template)")


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of all special tokens, including added tokens flagged special (e.g. ``<|im_end|>``)."""
    special = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    return special
