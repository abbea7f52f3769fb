"""Folders in the spelling transformers 4.57 (NeMo's environment) reads, loading in
transformers 5 as the folder ``save_pretrained`` writes does: the tokenizer's class, ids, special
tokens and chat template, and the model config's rotary settings. (4.57 itself reads them in
``tests/export/test_export_nemo.py``.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, Qwen2Config

from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.checkpoint.portable_folders import make_folder_portable, portable_tokenizer_config, save_tokenizer
from fastmath_nemo.data.tokenizer import CHAT_TEMPLATE, train_tokenizer
from fastmath_nemo.pipeline import load_tokenizer
from fastmath_nemo.policy.torch_policy import TorchPolicy

TEXTS = ["What is 12+345? <think>12+345=357</think> \\boxed{357}<|im_end|>",
         "<|im_start|>user\n(hello)  a\u0301b\n\n  x<|endoftext|>"]
CHAT = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>5</think> \\boxed{5}"}]


def _loaded(tokenizer) -> dict:
    """Everything of a tokenizer that the stages, vLLM and the export depend on."""
    return {"class": type(tokenizer).__name__, "ids": [tokenizer.encode(t) for t in TEXTS],
            "special": (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token,
                        tokenizer.eos_token_id, tokenizer.pad_token_id),
            "all_special": tokenizer.all_special_tokens, "extra_special": list(tokenizer.extra_special_tokens),
            "added": {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()},
            "chat_template": tokenizer.chat_template,
            "chat": tokenizer.apply_chat_template(CHAT, tokenize=False)}


def _config(folder: Path) -> dict:
    return json.loads((folder / "tokenizer_config.json").read_text())


def _reload(folder: Path):
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def task_tokenizer():
    corpus = [f"What is {a}+{b}? <think>{a}+{b}={a + b}</think> \\boxed{{{a + b}}}"
              for a in range(40) for b in range(40)]
    return train_tokenizer(corpus, vocab_size=300)


def test_the_embedded_tokenizer_folder_is_portable_and_loads_as_before(task_tokenizer, tmp_path):
    plain, portable = tmp_path / "plain", tmp_path / "portable"
    task_tokenizer.save_pretrained(str(plain))  # transformers 5's own spelling
    save_tokenizer(task_tokenizer, portable)

    before = _config(plain)
    assert (before["tokenizer_class"], before["extra_special_tokens"]) == ("TokenizersBackend", ["<|im_start|>"])
    after = _config(portable)
    assert after == {**{k: v for k, v in before.items() if k != "extra_special_tokens"},
                     "tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<|im_start|>"]}
    # Only the config differs: tokenizer.json and the chat template are transformers 5's own.
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (portable / name).read_bytes() == (plain / name).read_bytes(), name
    assert sorted(p.name for p in portable.iterdir()) == sorted(p.name for p in plain.iterdir())

    loaded = _loaded(_reload(portable))
    assert loaded == _loaded(_reload(plain))
    assert loaded["class"] == "TokenizersBackend"
    assert loaded["special"] == (None, "<|im_end|>", "<|endoftext|>", None, 2, 0)
    assert loaded["extra_special"] == ["<|im_start|>"] and loaded["chat_template"] == CHAT_TEMPLATE
    assert loaded["added"] == {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>",
                               290: "<think>", 291: "</think>"}  # the corpus merges to 290 of the 300 asked
    # And as trained, before any save: the same ids.
    assert loaded["ids"] == [task_tokenizer.encode(t) for t in TEXTS]
    assert loaded["ids"][0][-1] == 2 and loaded["ids"][1][0] == 1 and loaded["ids"][1][-1] == 0
    assert 290 in loaded["ids"][0] and 291 in loaded["ids"][0]


def test_a_stage_checkpoint_keeps_the_model_class_and_loads_as_before(tiny_task, task_tokenizer, tmp_path):
    """A stage's tokenizer, loaded from a Qwen2 folder as the pipeline does (transformers 5 picks
    ``Qwen2Tokenizer`` there, which 4.57 knows too): the manager's ``final/`` changes only
    ``extra_special_tokens`` and loads like a plain ``save_pretrained`` of the same tokenizer."""
    base = tmp_path / "base"
    tiny_task.model.save_pretrained(str(base))
    save_tokenizer(tiny_task.tokenizer, base)
    tokenizer = load_tokenizer(base)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"

    final = CheckpointManager(tmp_path / "sft", tokenizer).save_final(
        TorchPolicy(copy.deepcopy(tiny_task.model), torch.device("cpu")), {})
    plain = tmp_path / "plain"
    tokenizer.save_pretrained(str(plain))
    before, after = _config(plain), _config(final)
    assert before["tokenizer_class"] == after["tokenizer_class"] == "Qwen2Tokenizer"
    assert "extra_special_tokens" not in after and after["additional_special_tokens"] == before["extra_special_tokens"]
    assert after == {**{k: v for k, v in before.items() if k != "extra_special_tokens"},
                     "additional_special_tokens": ["<|im_start|>"]}

    loaded = _loaded(_reload(final))
    assert loaded == _loaded(_reload(plain)) == _loaded(tokenizer)
    assert loaded["special"] == (None, "<|im_end|>", "<|endoftext|>", "<|endoftext|>", 2, 0)
    assert loaded["extra_special"] == ["<|im_start|>"] and loaded["chat_template"] == CHAT_TEMPLATE


def test_portable_config_rules():
    """Named extra tokens (a dict: 4.57's form) and model-specific classes stay; a list joins
    ``additional_special_tokens`` without repeats."""
    named = {"tokenizer_class": "LlamaTokenizer", "extra_special_tokens": {"image_token": "<image>"}}
    assert portable_tokenizer_config(named) == named
    listed = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>", "<b>"],
              "additional_special_tokens": ["<b>", "<c>"], "model_max_length": 512}
    assert portable_tokenizer_config(listed) == {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
                                                 "additional_special_tokens": ["<b>", "<c>", "<a>"]}
    assert listed["extra_special_tokens"] == ["<a>", "<b>"]  # the input is not modified


ROPE_CASES = {
    "qwen2.5-base": (Qwen2Config, {"rope_theta": 1e6}, 1e6, None),
    "llama3-scaling": (LlamaConfig, {"rope_theta": 5e5, "max_position_embeddings": 16384,
                                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}},
                       5e5, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_a_model_config_carries_its_rotary_settings_in_both_spellings(case: str, tmp_path: Path) -> None:
    """transformers 5 writes only ``rope_parameters``; the legacy keys 4.57 reads are added, and
    transformers 5 loads the folder as before."""
    config_class, rope, theta, scaling = ROPE_CASES[case]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=100, **rope)
    plain, portable = tmp_path / "plain", tmp_path / "portable"
    config.save_pretrained(str(plain))
    config.save_pretrained(str(portable))
    make_folder_portable(portable)
    before = json.loads((plain / "config.json").read_text())
    after = json.loads((portable / "config.json").read_text())
    assert "rope_theta" not in before and before["rope_parameters"]["rope_theta"] == theta
    assert after == {**before, "rope_theta": theta, "rope_scaling": scaling}
    reloaded = {k: v for k, v in AutoConfig.from_pretrained(str(portable)).to_dict().items() if k != "_name_or_path"}
    expected = {k: v for k, v in AutoConfig.from_pretrained(str(plain)).to_dict().items() if k != "_name_or_path"}
    assert reloaded == expected
