"""``export.format=megatron``: the checkpoint loads into a real ``GPTModel`` through its own
``sharded_state_dict()`` with every tensor bit-exact, for Qwen2, Qwen3 and Llama; and a
megatron-backend stage checkpoint exports like a PyTorch one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _hf_folders import MODEL_TYPES, safetensors_state, write_hf_folder  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from fastmath_nemo.config.schema import ExportConfig  # noqa: E402
from fastmath_nemo.export import export_checkpoint  # noqa: E402

pytestmark = pytest.mark.megatron

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_megatron_export_loads_into_gpt_model(model_type: str, tmp_path: Path, one_thread) -> None:
    from megatron.core import dist_checkpointing

    from fastmath_nemo.policy.megatron.config import transformer_config_from_hf
    from fastmath_nemo.policy.megatron.layer_spec import gpt_layer_spec
    from fastmath_nemo.policy.megatron.model import build_gpt_model, load_hf_weights
    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel

    source = write_hf_folder(model_type, tmp_path / "hf")
    out = export_checkpoint(ExportConfig(checkpoint=str(source), format="megatron", dir=str(tmp_path / "mcore")))
    assert json.loads((out / "metadata.json").read_text()) == METADATA_JSON
    beside = json.loads((out / "config.json").read_text())
    assert beside == json.loads((source / "config.json").read_text())  # the HF config to rebuild the model

    hf_config = AutoConfig.from_pretrained(str(source))
    init_model_parallel(1, 1, seed=0)
    try:
        def model():
            return build_gpt_model(hf_config, transformer_config_from_hf(hf_config),
                                   gpt_layer_spec("sdpa", model_type == "qwen3"))

        expected = model()
        load_hf_weights(expected, source, hf_config)
        loaded_model = model()
        loaded = dist_checkpointing.load(loaded_model.sharded_state_dict(), str(out))
        assert loaded.pop("content_metadata") == {"singleton_local_shards": False}
        loaded_model.load_state_dict(loaded)
    finally:
        destroy_model_parallel()
    want, got = expected.state_dict(), loaded_model.state_dict()
    tensors = [k for k, v in want.items() if torch.is_tensor(v) and not k.endswith("_extra_state")]
    assert len(tensors) >= 2 + 6 * hf_config.num_hidden_layers  # embedding, final norm, 6+ per layer
    for key in tensors:
        assert torch.equal(got[key], want[key]), key


def test_megatron_backend_stage_checkpoint_exports_bit_exact(tmp_path: Path, one_thread) -> None:
    """A training checkpoint the megatron policy wrote (megatron/: every rank's shards of the
    model and optimizer, no gathered Hugging Face copy) exports, read at TP=1 and streamed one
    tensor at a time, to the weights the policy holds, bit for bit."""
    from fastmath_nemo.checkpoint.manager import CheckpointManager
    from fastmath_nemo.config.schema import MegatronConfig
    from fastmath_nemo.pipeline import load_tokenizer
    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    source = write_hf_folder("qwen2", tmp_path / "hf")
    policy = MegatronPolicy(source, MegatronConfig(attention_backend="sdpa"))
    try:
        with torch.no_grad():  # weights that differ from the source folder's
            for param in policy.model.parameters():
                param.mul_(1.5)
        held = {name: tensor.clone() for name, tensor in policy.export_weights()}
        CheckpointManager(tmp_path / "sft", load_tokenizer(source)).save(policy, step=4, state={})
    finally:
        destroy_model_parallel()
    step_4 = tmp_path / "sft" / "checkpoints" / "step_4"
    assert (step_4 / "megatron").is_dir() and not list(step_4.glob("*.safetensors"))
    out = export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "sft"), format="hf", dir=str(tmp_path / "hf_out")))
    exported = safetensors_state(out)
    assert exported.keys() == held.keys()
    for name, tensor in held.items():
        assert torch.equal(exported[name], tensor), name
    assert not torch.equal(exported["model.norm.weight"], safetensors_state(source)["model.norm.weight"])
