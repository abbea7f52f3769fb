"""Tests for fastmath_nemo.data.tokenizer: the offline task tokenizer and its chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fastmath_nemo.config.schema import ModelConfig
from fastmath_nemo.data.tokenizer import build_task_tokenizer, train_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 34?"},
    {"role": "assistant", "content": "<think>\n12+34: 2+4=6, 1+3=4, so 46.\n</think>\nThe answer is 46."},
]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n12+34: 2+4=6, 1+3=4, so 46.\n</think>\nThe answer is 46.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok(tiny_task):
    return tiny_task.tokenizer


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("word", ["<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_marker_tokens_are_single_tokens(tok, word):
    ids = _ids(tok, word)
    assert len(ids) == 1
    assert tok.convert_ids_to_tokens(ids) == [word]
    # also inside running text, without spaces around it
    in_text = _ids(tok, f"so 46.{word}The")
    assert ids[0] in in_text
    assert tok.decode(in_text) == f"so 46.{word}The"


def test_special_token_roles(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert tok.pad_token_id != tok.eos_token_id
    assert _ids(tok, "hi") == tok.encode("hi")  # no BOS / EOS added around text


def test_numbers_split_into_single_digits(tok):
    ids = _ids(tok, "12345")
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]


def test_chat_roles_are_single_tokens(tiny_task):
    """At the pipeline's vocabulary size (model.tokenizer_vocab_size), though no text has them."""
    tok = train_tokenizer([r.trace for r in tiny_task.train], vocab_size=ModelConfig().tokenizer_vocab_size)
    for role in ("system", "user", "assistant"):
        prompt = tok.apply_chat_template([{"role": role, "content": "x"}], tokenize=False)
        assert role in [tok.decode([i]) for i in _ids(tok, prompt)], role


def test_decode_encode_roundtrip(tok, tiny_task):
    texts = [r.trace for r in tiny_task.train[:5]] + [r.problem for r in tiny_task.held_out[:3]]
    texts += ["héllo ✓ 漢字  two  spaces\n\ttab", CHATML]
    for text in texts:
        assert tok.decode(_ids(tok, text)) == text


def test_think_tokens_survive_skip_special_tokens(tok):
    ids = _ids(tok, "<think>\nx\n</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>"


def test_bpe_compresses_the_task_text(tok, tiny_task):
    trace = tiny_task.train[0].trace
    assert len(_ids(tok, trace)) < 0.8 * len(trace.encode())


def test_chat_template_is_chatml(tok):
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == CHATML
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=False)
    assert prompt == no_prompt + "<|im_start|>assistant\n"


def test_chat_template_ids(tok):
    ids = tok.apply_chat_template(MESSAGES[1:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == _ids(tok, "<|im_start|>user\nWhat is 12 + 34?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_save_pretrained_roundtrip(tmp_path, tiny_task, tok):
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.chat_template == tok.chat_template
    assert len(loaded) == len(tok)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    for text in [tiny_task.train[0].trace, CHATML, "</think>"]:
        assert _ids(loaded, text) == _ids(tok, text)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == CHATML
    assert len(_ids(loaded, "</think>")) == 1
    assert loaded.decode(_ids(loaded, "<think>x</think><|im_end|>"), skip_special_tokens=True) == "<think>x</think>"


def test_build_task_tokenizer_writes_a_loadable_folder(tmp_path, tiny_task):
    corpus = [r.trace for r in tiny_task.train[:50]]
    built = build_task_tokenizer(corpus, tmp_path, vocab_size=300)
    assert len(built) <= 300 + 2  # BPE vocabulary plus the two think tokens
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert _ids(loaded, corpus[0]) == _ids(built, corpus[0])
    assert loaded.chat_template == built.chat_template
