"""``export.format=hf`` through the command line: a stage checkpoint back as a Hugging Face
folder, bit-exact, that transformers loads; and which folder ``export.checkpoint`` picks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _hf_folders import as_stage_checkpoint, safetensors_state, write_hf_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmath_nemo.checkpoint.atomic import is_complete, mark_complete
from fastmath_nemo.export.source import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
from run import main  # noqa: E402  (launch/run.py: the command line, in this process)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])  # untied with QKV bias; tied with QK norm
def test_cli_export_hf_is_bit_exact_and_loads(model_type: str, tmp_path: Path, one_thread) -> None:
    source = write_hf_folder(model_type, tmp_path / "hf")
    as_stage_checkpoint(source, tmp_path / "grpo")
    out = tmp_path / "export"
    # The README's example, with a stage directory: its latest checkpoint is exported.
    assert main(["conf=export", f"export.checkpoint={tmp_path / 'grpo'}", "export.format=hf",
                 f"export.dir={out}"]) == 0
    assert is_complete(out) and not (out / "trainer_state.pt").exists()
    original = safetensors_state(source)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.config.model_type == model_type and model.dtype == torch.float32
    loaded = model.state_dict()
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in safetensors_state(out)
        assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(source)).chat_template
    assert tokenizer("What is 12+7?").input_ids == AutoTokenizer.from_pretrained(str(source))("What is 12+7?").input_ids


def test_export_dtype_casts_every_tensor(tmp_path: Path, one_thread) -> None:
    source = write_hf_folder("llama", tmp_path / "hf")
    out = tmp_path / "bf16"
    assert main(["conf=export", f"export.checkpoint={source}", "export.dtype=bfloat16", f"export.dir={out}"]) == 0
    exported = safetensors_state(out)
    for name, tensor in safetensors_state(source).items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


def test_resolve_checkpoint_prefers_final_then_latest_step(tmp_path: Path) -> None:
    stage = tmp_path / "sft"
    for step in (2, 10):
        folder = stage / "checkpoints" / f"step_{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        mark_complete(folder)
    assert resolve_checkpoint(stage) == stage / "checkpoints" / "step_10"  # 10 > 2 numerically
    (stage / "final").mkdir()
    assert resolve_checkpoint(stage) == stage / "checkpoints" / "step_10"  # an incomplete final is skipped
    mark_complete(stage / "final")
    assert resolve_checkpoint(stage) == stage / "final"
    assert resolve_checkpoint(stage / "checkpoints" / "step_2") == stage / "checkpoints" / "step_2"
    with pytest.raises(FileNotFoundError, match=r"export.checkpoint=.*not a model folder"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        resolve_checkpoint(tmp_path)
