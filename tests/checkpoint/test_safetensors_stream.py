"""The streaming safetensors writer gives folders that safetensors and transformers read back
bit for bit, in any write order, in one file or several."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config

from fastmath_nemo.checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 5, generator=gen), "b.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
            "c.scale": torch.randn(1, generator=gen).to(torch.float16), "d.table": torch.randn(4, 2, 3, generator=gen)}


def _layout(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64], ids=["one-file", "sharded"])
def test_any_write_order_reads_back_bit_for_bit(tmp_path, max_shard_bytes) -> None:
    tensors = _tensors()
    writer = SafetensorsStreamWriter(tmp_path, _layout(tensors), max_shard_bytes=max_shard_bytes)
    names = list(tensors)
    random.Random(1).shuffle(names)
    for name in names:
        writer.write(name, tensors[name])
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    read = {k: v for f in files for k, v in load_file(str(f)).items()}  # safetensors validates the offsets
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    if max_shard_bytes == 64:  # 60 + 14 + 2 + 96 bytes: a.weight alone, then b + c, then d
        assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["d.table"] == "model-00003-of-00003.safetensors"
        assert index["metadata"]["total_size"] == 172
    else:
        assert [f.name for f in files] == ["model.safetensors"]
        with safe_open(str(files[0]), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_missing_wrong_or_repeated_tensors_are_refused(tmp_path) -> None:
    tensors = _tensors()
    writer = SafetensorsStreamWriter(tmp_path, _layout(tensors))
    with pytest.raises(ValueError, match="a.weight: got torch.float32 \\(5, 3\\)"):
        writer.write("a.weight", tensors["a.weight"].t().contiguous())
    with pytest.raises(KeyError, match="not in the layout"):
        writer.write("e.extra", torch.zeros(1))
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="written already"):
        writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="3 tensors of the layout were not written"):
        writer.close()


def test_transformers_loads_a_streamed_model_folder(tmp_path) -> None:
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    config.save_pretrained(tmp_path)
    writer = SafetensorsStreamWriter(tmp_path, _layout(state), max_shard_bytes=20_000)
    for name in reversed(list(state)):
        writer.write(name, state[name])
    writer.close()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
