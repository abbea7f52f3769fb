"""Hugging Face folders that transformers 5 (the main environment, vLLM) and transformers 4.57
(NeMo 2.7.3's environment, ``.ci/nemo_export``) both read as the same model and tokenizer.

transformers 5's ``save_pretrained`` writes three things 4.57 misreads:

- ``tokenizer_config.json``: ``tokenizer_class: TokenizersBackend`` (4.57: "does not exist")
  and ``extra_special_tokens`` as a list (4.57 takes a dict of named tokens: ``'list' object has
  no attribute 'keys'``). Spelled the way each version reads as the same tokenizer:
  ``PreTrainedTokenizerFast`` (transformers 5's alias of the very class; 4.57 builds its generic
  fast tokenizer from ``tokenizer.json``; model-specific names such as ``Qwen2Tokenizer`` are
  known to both and kept) and ``additional_special_tokens`` (4.57's list, which transformers 5
  renames to ``extra_special_tokens`` on load).
- ``config.json``: the rotary settings only as ``rope_parameters``, which 4.57 ignores, silently
  falling back to a base of 10,000 and no scaling (Qwen2.5's base is 1,000,000, Llama 3's
  scaling is gone). The legacy ``rope_theta`` / ``rope_scaling`` are written beside it: 4.57
  reads them, transformers 5 builds the same ``rope_parameters`` from either.

Every folder the project writes goes through :func:`make_folder_portable` (and every tokenizer
through :func:`save_tokenizer`, which calls it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.checkpoint.atomic import atomic_write_json

TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_CONFIG = "config.json"
# transformers 5 class names that 4.57 lacks -> the name both read as the same class.
_PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``tokenizer_config.json``) in the spelling both transformers 4.57 and 5 read."""
    out = dict(config)
    name = out.get("tokenizer_class")
    if isinstance(name, str):
        out["tokenizer_class"] = _PORTABLE_CLASSES.get(name, name)
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):
        del out["extra_special_tokens"]
        merged = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
    return out


def portable_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``config.json``) with ``rope_theta`` and ``rope_scaling`` (None for the
    default rotary embedding) beside transformers 5's ``rope_parameters``."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return dict(config)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {**config, "rope_theta": rope["rope_theta"],
            "rope_scaling": scaling if scaling.get("rope_type", "default") != "default" else None}


def _rewrite(path: Path, portable) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    fixed = portable(config)
    if fixed != config:
        atomic_write_json(path, fixed)


def make_folder_portable(directory: str | Path) -> None:
    """Rewrite ``directory``'s ``tokenizer_config.json`` and ``config.json`` (those present;
    atomically) as both transformers versions read them."""
    _rewrite(Path(directory) / TOKENIZER_CONFIG, portable_tokenizer_config)
    _rewrite(Path(directory) / MODEL_CONFIG, portable_model_config)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, then :func:`make_folder_portable` (the folder's
    ``config.json`` too, where the model was saved first)."""
    tokenizer.save_pretrained(str(directory))
    make_folder_portable(directory)
