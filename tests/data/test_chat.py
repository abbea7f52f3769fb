"""Tests for fastmath_nemo.data.chat with a tiny byte-level BPE tokenizer built offline."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastmath_nemo.data.chat import ChatTemplateError, prompt_ids, sft_example

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


def test_template_that_rewrites_the_reply_is_rejected() -> None:
    # Like DeepSeek-R1 templates, which drop everything before '</think>' in assistant turns.
    reply_only = "(message['content'].split('</think>')[-1] if message['role'] == 'assistant' else message['content'])"
    bad = CHATML_TEMPLATE.replace("message['content']", reply_only)
    with pytest.raises(ChatTemplateError, match="does not contain the trace"):
        sft_example(build_tokenizer(bad), PROBLEM, "<think>hmm</think>" + TRACE, SYSTEM)


def test_missing_template_is_rejected() -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        prompt_ids(tok, PROBLEM, None)
