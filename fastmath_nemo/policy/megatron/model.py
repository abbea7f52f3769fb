"""Build a megatron-core ``GPTModel`` for a Hugging Face config and load HF weights into it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from torch import Tensor

from fastmath_nemo.policy.megatron.config import rope_settings
from fastmath_nemo.policy.megatron.convert import hf_to_mcore, padded_vocab_size, te_names
from fastmath_nemo.policy.megatron.norm import SequenceParallelRMSNorm


class HiddenStateGPTModel(GPTModel):
    """``GPTModel`` whose last stage returns the final hidden states ``[s, b, H]`` (after the
    final norm, before the output layer) when ``return_hidden`` is set, so the policy can
    compute logprobs from them chunk by chunk (``logprobs.py``) instead of receiving
    ``[b, s, V / tp]`` logits.

    Why an override of ``_postprocess`` rather than the alternatives: calling ``decoder``
    directly would duplicate ``forward``'s embedding, RoPE and pipeline-input handling;
    building the last stage without ``post_process`` would drop the final norm and the
    output layer's parameters (checkpoints, tied-embedding sync); swapping the output layer
    for an identity at run time would hide a module from its own model. ``_postprocess``
    receives the decoder's output and only applies the output layer (and MTP, which this
    project does not build) to it, so returning before that is the one-line change.
    """

    return_hidden: bool = False

    def _postprocess(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.return_hidden and self.post_process:
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)


def build_gpt_model(
    hf_config: Any,
    tcfg: TransformerConfig,
    layer_spec: ModuleSpec,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    return_hidden: bool = False,
) -> GPTModel:
    """This rank's ``GPTModel`` stage (model parallel must be initialised).

    ``pre_process`` / ``post_process`` (embedding / final norm + output layer) default to
    whether this is the first / last pipeline stage. Logits are vocab-parallel
    (``parallel_output=True``): ``[b, s, V_pad / tp]`` unless ``runtime_gather_output=True``;
    ``V_pad`` is the HF vocabulary rounded up to a multiple of TP (``padded_vocab_size``).
    ``return_hidden``: the last stage returns the final hidden states instead
    (:class:`HiddenStateGPTModel`).
    """
    spec: ModuleSpec | TransformerBlockSubmodules = layer_spec
    if layer_spec.submodules.input_layernorm is SequenceParallelRMSNorm:
        # The local spec: the final norm must be ours too (GPTModel would add WrappedTorchNorm,
        # which refuses sequence parallelism), so hand GPTModel the whole block.
        spec = TransformerBlockSubmodules(
            layer_specs=[layer_spec] * (tcfg.num_layers // tcfg.pipeline_model_parallel_size),
            layer_norm=SequenceParallelRMSNorm,
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    rope = rope_settings(hf_config)
    model = HiddenStateGPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(hf_config.vocab_size, tcfg.tensor_model_parallel_size),
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=rope.base,
        rope_scaling=rope.llama3_factor is not None,
        rope_scaling_factor=rope.llama3_factor or 8.0,
        seq_len_interpolation_factor=rope.linear_factor,
    )
    model.return_hidden = return_hidden
    return model


class _SafetensorsDir(Mapping[str, Tensor]):
    """Lazy read-only view of a HF folder's safetensors (single file or sharded with an index):
    a tensor is read from disk only when a rank asks for it."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
        self._folder, self._files = folder, weight_map

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._folder / self._files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._files  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def load_hf_weights(model: GPTModel, hf_dir_or_state: str | Path | Mapping[str, Tensor], hf_config: Any) -> None:
    """Copy this (TP, PP) rank's shards of a HF checkpoint (folder or state dict) into ``model``.

    Raises if any parameter of the model is left unset or a converted name does not exist.
    """
    hf_state = (
        hf_dir_or_state if isinstance(hf_dir_or_state, Mapping) else _SafetensorsDir(Path(hf_dir_or_state))
    )
    state = hf_to_mcore(
        hf_state,
        hf_config,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    model_keys = model.state_dict().keys()
    if any(k.endswith("linear_qkv.layer_norm_weight") for k in model_keys):
        state = te_names(state)  # Transformer Engine spec: pre-norms fused into the linears
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"HF -> megatron weights mismatch: missing {missing}, unexpected {result.unexpected_keys}")
