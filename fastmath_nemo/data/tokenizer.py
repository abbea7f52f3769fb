"""An offline tokenizer for the embedded task, saved as a Hugging Face tokenizer.

Byte-level BPE trained on the task's own text with single-digit number splitting (as
Qwen2's tokenizer does), ``<think>``/``</think>`` as single tokens, and a ChatML chat
template, so the tiny model goes through exactly the path a real model folder does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastmath_nemo.checkpoint.portable_folders import save_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
CHAT_ROLES = ("system", "user", "assistant")

# ChatML, as Qwen2 uses; the assistant turn ends with <|im_end|> which is also EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Every text framed by the chat template's role names, which become words of their own:
    # "assistant" heads every prompt and took 7 tokens when only the task's text was trained on.
    framing = "\n".join(CHAT_ROLES)
    tok.train_from_iterator((f"{framing}\n{text}" for text in texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    # Added (not special) so that they survive decode(skip_special_tokens=True), as in R1 models.
    hf.add_tokens(THINK_TOKENS)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_task_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer(texts, vocab_size)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer
