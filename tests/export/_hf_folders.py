"""Tiny Hugging Face model folders (Qwen2, Qwen3, Llama) with a trained byte-level tokenizer,
as a stage checkpoint holds them: config.json, model.safetensors, tokenizer files."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policy" / "megatron"))  # _megatron_tiny

from _megatron_tiny import MODEL_TYPES, tiny_hf_model  # noqa: E402

__all__ = ["MODEL_TYPES", "as_stage_checkpoint", "safetensors_state", "write_hf_folder"]

VOCAB = 320  # the byte-level BPE needs 256 + specials; the model's vocabulary matches it


def write_hf_folder(model_type: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny ``model_type`` model (weights ~ N(0, 0.2), norms ~ N(1, 0.2); Qwen3 tied;
    ``overrides``: config fields) and its tokenizer into ``directory``; returns it."""
    from fastmath_nemo.data.tokenizer import train_tokenizer

    corpus = [f"What is {a}+{b}? The answer is \\boxed{{{a + b}}}." for a in range(30) for b in range(30)]
    tokenizer = train_tokenizer(corpus, vocab_size=VOCAB)
    model = tiny_hf_model(model_type, seed=seed, **{"vocab_size": len(tokenizer), **overrides})
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
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
