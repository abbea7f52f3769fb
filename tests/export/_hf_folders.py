"""Tiny Hugging Face model folders (Qwen2, Qwen3, Llama) with a trained byte-level tokenizer,
as a stage checkpoint holds them: config.json, model.safetensors, tokenizer files. And a stage
checkpoint trained by the main environment (``python tests/export/_hf_folders.py RUN_DIR``),
which NeMo's environment exports (``.ci/nemo_export``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "policy" / "megatron"))  # _megatron_tiny

from _megatron_tiny import MODEL_TYPES, tiny_hf_model  # noqa: E402

__all__ = ["MODEL_TYPES", "as_stage_checkpoint", "main_env_checkpoint", "safetensors_state",
           "tokenizer_expectations", "tokenizer_expectations_path", "train_main_env_checkpoint", "write_hf_folder"]

VOCAB = 320  # the byte-level BPE needs 256 + specials; the model's vocabulary matches it


def write_hf_folder(model_type: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny ``model_type`` model (weights ~ N(0, 0.2), norms ~ N(1, 0.2); Qwen3 tied;
    ``overrides``: config fields) and its tokenizer into ``directory``; returns it."""
    from fastmath_nemo.checkpoint.portable_folders import save_tokenizer
    from fastmath_nemo.data.tokenizer import train_tokenizer

    corpus = [f"What is {a}+{b}? The answer is \\boxed{{{a + b}}}." for a in range(30) for b in range(30)]
    tokenizer = train_tokenizer(corpus, vocab_size=VOCAB)
    model = tiny_hf_model(model_type, seed=seed, **{"vocab_size": len(tokenizer), **overrides})
    model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(tokenizer, directory)
    return directory


def as_stage_checkpoint(hf_folder: Path, stage_dir: Path, step: int = 2) -> Path:
    """Copy ``hf_folder`` to ``stage_dir/checkpoints/step_<step>`` as a stage writes it (with a
    trainer state file and the ``COMPLETE`` marker); returns the checkpoint folder."""
    import shutil

    import torch

    from fastmath_nemo.checkpoint.atomic import mark_complete
    from fastmath_nemo.checkpoint.trainer_state import TRAINER_STATE

    target = stage_dir / "checkpoints" / f"step_{step}"
    shutil.copytree(hf_folder, target)
    torch.save({"extra": {"step": step}}, target / TRAINER_STATE)
    mark_complete(target)
    return target


def safetensors_state(folder: Path) -> dict:
    """Every tensor in ``folder``'s safetensors files, by name."""
    from safetensors.torch import load_file

    state: dict = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


# -- a checkpoint trained by the main environment (transformers 5), for NeMo's (4.57) ----------
# What the main environment's tokenizer encodes, checked again where NeMo runs: digits, the
# think tokens (added, not special), special tokens, a combining accent (NFC in Qwen2's), spaces.
TOKENIZER_TEXTS = ["What is 12+345? <think>12+345=357</think> \\boxed{357}<|im_end|>",
                   "<|im_start|>user\n(hello)  a\u0301b\n\n  x<|endoftext|>"]
CHAT = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "<think>5</think> \\boxed{5}"}]
# A one-epoch SFT of a 2-layer model on 64 synthetic problems: about 15 s on 2 busy cores.
MAIN_ENV_SFT = ["conf=sft", "data.synthetic.n_train=64", "data.synthetic.n_eval=8", "sft.epochs=1",
                "sft.rows_per_step=8", "policy.micro_batch_rows=4", "policy.device=cpu", "model.tiny.hidden_size=64",
                "model.tiny.num_layers=2", "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=2",
                "model.tiny.intermediate_size=128", "model.tiny.rope_theta=1000000.0"]  # Qwen2.5's base


def tokenizer_expectations_path(checkpoint: Path) -> Path:
    """Where the main environment records what ``checkpoint``'s tokenizer encodes: beside it."""
    return checkpoint.with_name(f"{checkpoint.name}.tokenizer_expected.json")


def tokenizer_expectations(tokenizer) -> dict:
    """What a loaded tokenizer gives: ids of ``TOKENIZER_TEXTS``, its special tokens, the chat
    template's text for ``CHAT`` and that text's ids (the same keys in either environment)."""
    import transformers

    chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    return {"transformers": transformers.__version__, "texts": TOKENIZER_TEXTS,
            "ids": [tokenizer.encode(text) for text in TOKENIZER_TEXTS],
            "special_tokens": {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "bos": tokenizer.bos_token,
                               "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id},
            "chat_text": chat, "chat_ids": tokenizer.encode(chat, add_special_tokens=False)}


def train_main_env_checkpoint(run_dir: Path) -> Path:
    """Run ``MAIN_ENV_SFT`` into ``run_dir`` with this interpreter (the main environment's) and
    record its tokenizer's encodings beside the checkpoint; returns ``<run_dir>/sft/final``."""
    import json

    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "launch"))
    from run import main

    assert main([*MAIN_ENV_SFT, f"run.dir={run_dir}"]) == 0
    checkpoint = run_dir / "sft" / "final"
    expected = tokenizer_expectations(AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True))
    tokenizer_expectations_path(checkpoint).write_text(json.dumps(expected, ensure_ascii=False))
    return checkpoint


def main_env_checkpoint(run_dir: Path, python: str) -> Path:
    """:func:`train_main_env_checkpoint` run by interpreter ``python`` (this checkout first on
    its path); raises ``subprocess.CalledProcessError`` or ``OSError`` where it cannot."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([python, str(Path(__file__).resolve()), str(run_dir)], env=env, check=True, timeout=600)
    return run_dir / "sft" / "final"


if __name__ == "__main__":  # .ci/nemo_export: python tests/export/_hf_folders.py RUN_DIR (main environment)
    print(train_main_env_checkpoint(Path(sys.argv[1])))
