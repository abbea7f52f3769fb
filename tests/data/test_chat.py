"""Tests for fastmath_nemo.data.chat with a tiny byte-level BPE tokenizer built offline."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastmath_nemo.algorithms.sft import tokenize_sft
from fastmath_nemo.data import chat
from fastmath_nemo.data.chat import (
    ChatTemplateError,
    check_chat_template,
    prompt_ids,
    resolve_chat_template,
    sft_example,
)
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits
from fastmath_nemo.data.tokenizer import train_tokenizer

from _templates import R1_STYLE_TEMPLATE  # noqa: E402  (tests/_templates.py)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM = "Solve for x: 2x + 3 = 7."
TRACE = "Subtract 3: 2x = 4.\nDivide by 2: x = 2.\nThe answer is \\boxed{2}."


def build_tokenizer(template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """Byte-level BPE (decodes back to the exact text) trained on a few strings."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SYSTEM, PROBLEM, TRACE, "system user assistant"] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=template,
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.mark.parametrize("system_prompt", [SYSTEM, None])
def test_prompt_ids(tokenizer: PreTrainedTokenizerFast, system_prompt: str | None) -> None:
    ids = prompt_ids(tokenizer, PROBLEM, system_prompt)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    expected = (f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else "") + (
        f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(ids) == expected


@pytest.mark.parametrize("system_prompt", [SYSTEM, None])
def test_sft_mask_covers_exactly_the_assistant_reply(
    tokenizer: PreTrainedTokenizerFast, system_prompt: str | None
) -> None:
    ids, mask = sft_example(tokenizer, PROBLEM, TRACE, system_prompt)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    prompt = prompt_ids(tokenizer, PROBLEM, system_prompt)
    assert ids[: len(prompt)] == prompt
    assert mask[: len(prompt)] == [0] * len(prompt)

    targets = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(targets) == TRACE + "<|im_end|>"
    # The targets are one contiguous span starting right after the generation prompt,
    # ending with the end-of-turn token; only the template's trailing "\n" is left out.
    first = mask.index(1)
    last = len(mask) - 1 - mask[::-1].index(1)
    assert first == len(prompt) and sum(mask) == last - first + 1
    assert ids[last] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids[last + 1 :]) == "\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        + [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": TRACE}],
        tokenize=False,
    )


def test_template_whose_prompt_is_not_a_prefix_is_rejected() -> None:
    # The generation prompt opens a think block that the rendered assistant turn lacks.
    bad = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        sft_example(build_tokenizer(bad), PROBLEM, TRACE, SYSTEM)


def test_missing_template_is_rejected() -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        prompt_ids(tok, PROBLEM, None)


# -- templates that rewrite assistant turns ---------------------------------------------------------
R1_STYLE_NO_THINK_PROMPT = R1_STYLE_TEMPLATE.replace("assistant\\n<think>\\n", "assistant\\n")
R1_TRACE = "<think>\nSubtract 3: 2x = 4.\nDivide by 2: x = 2.\n</think>\n\nThe answer is \\boxed{2}."
REWRITE_NOTE = "rewrites assistant turns"


def embedded_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """The project's embedded task tokenizer (``<think>`` / ``</think>`` single tokens, eos
    ``<|im_end|>``) trained on task text and these tests' strings, with ``template`` set."""
    train, _ = generate_splits(SyntheticTaskConfig(seed=3, n_train=16, n_eval=1))
    corpus = [f"{SYSTEM}\n{r.problem}\n{r.trace}" for r in train] + [PROBLEM, R1_TRACE] * 3
    tok = train_tokenizer(corpus, vocab_size=320)
    tok.chat_template = template
    return tok


@pytest.fixture(autouse=True)
def fresh_log_once() -> None:
    chat._log_once.cache_clear()  # the note is once per process: each test starts without it


def test_r1_style_template_does_drop_the_thinking() -> None:
    """Precondition of the tests below: the template really rewrites the assistant turn."""
    tok = embedded_tokenizer(R1_STYLE_TEMPLATE)
    rendered = tok.apply_chat_template(chat.messages_for(PROBLEM, SYSTEM, R1_TRACE), tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n\n\nThe answer is \\boxed{2}.<|im_end|>\n")
    assert "Subtract 3" not in rendered


@pytest.mark.parametrize("template, opens_think", [(R1_STYLE_TEMPLATE, True), (R1_STYLE_NO_THINK_PROMPT, False)],
                         ids=["think-in-generation-prompt", "plain-generation-prompt"])
def test_rewriting_template_gives_prompt_then_trace_then_eos(template: str, opens_think: bool) -> None:
    tok = embedded_tokenizer(template)
    ids, mask = sft_example(tok, PROBLEM, R1_TRACE, SYSTEM)

    prompt = prompt_ids(tok, PROBLEM, SYSTEM)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    think = tok.convert_tokens_to_ids("<think>")
    # The generation prompt already holds "<think>\n": the trace continues after it.
    reply_text = R1_TRACE.removeprefix("<think>\n") if opens_think else R1_TRACE
    assert ids == prompt + tok.encode(reply_text, add_special_tokens=False) + [eos]
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids.count(think) == 1 and ids.count(tok.convert_tokens_to_ids("</think>")) == 1
    assert tok.decode(ids[len(prompt) :]) == reply_text + "<|im_end|>"
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n" if opens_think else "assistant\n")


def test_rewrite_note_is_logged_once_per_run(caplog: pytest.LogCaptureFixture) -> None:
    tok = embedded_tokenizer(R1_STYLE_TEMPLATE)
    records = [MathRecord(problem=f"What is {i} + 1?", answer=str(i + 1), trace=R1_TRACE, source=str(i))
               for i in range(5)]
    with caplog.at_level(logging.INFO, logger="fastmath_nemo.data.chat"):
        data = tokenize_sft(records, tok, SYSTEM, max_seq_len=512)
    notes = [r.getMessage() for r in caplog.records if r.name == "fastmath_nemo.data.chat"]
    assert len(data.examples) == 5
    assert sum(REWRITE_NOTE in n for n in notes) == 1, notes
    assert sum("already ends with '<think>\\n'" in n for n in notes) == 1, notes
    assert all(n.count("'<|im_end|>'") == 1 for n in notes if REWRITE_NOTE in n)  # names the end-of-turn token


def test_template_keeping_the_trace_logs_no_note(caplog: pytest.LogCaptureFixture) -> None:
    tok = embedded_tokenizer(CHATML_TEMPLATE)
    with caplog.at_level(logging.INFO, logger="fastmath_nemo.data.chat"):
        ids, mask = sft_example(tok, PROBLEM, R1_TRACE, SYSTEM)
    assert not caplog.records
    # The template's own rendering: targets end at <|im_end|>, its trailing "\n" is not a target.
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == R1_TRACE + "<|im_end|>"
    assert tok.decode(ids[-1:]) == "\n" and mask[-1] == 0


def test_rewriting_template_without_eos_is_rejected() -> None:
    tok = embedded_tokenizer(R1_STYLE_TEMPLATE)
    tok.eos_token = None
    with pytest.raises(ChatTemplateError, match="no eos_token"):
        sft_example(tok, PROBLEM, R1_TRACE, SYSTEM)


def test_resolve_chat_template_string_file_and_missing(tmp_path: Path) -> None:
    assert resolve_chat_template(R1_STYLE_TEMPLATE) == R1_STYLE_TEMPLATE
    path = tmp_path / "r1.jinja"
    path.write_text(R1_STYLE_TEMPLATE, encoding="utf-8")
    assert resolve_chat_template(str(path)) == R1_STYLE_TEMPLATE
    with pytest.raises(ChatTemplateError, match="neither a Jinja template .* nor an existing file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("template, error", [
    ("{% for message in messages %}{{ message['content'] }}", "line 1.*endfor"),
    ("{{ messages | no_such_filter }}", "no_such_filter"),
])
def test_check_chat_template_rejects_what_does_not_compile(template: str, error: str) -> None:
    check_chat_template(R1_STYLE_TEMPLATE)  # a good one passes
    with pytest.raises(ChatTemplateError, match=error):
        check_chat_template(template)
