"""Hugging Face weights in megatron-core's checkpoint layout, without building a model.

A distributed checkpoint stores each global tensor under the key that
``GPTModel.sharded_state_dict()`` gives it, which does not depend on the TP / PP layout nor,
in megatron-core 0.16, on the layer spec (the local spec maps its norms to Transformer
Engine's names through ``sharded_state_dict_keys_map``)::

    embedding.word_embeddings.weight                           [V, H]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight [L, H]        input_layernorm
    decoder.layers.self_attention.linear_qkv.weight            [L, (nh + 2 ng) d, H]  GQA-interleaved
    decoder.layers.self_attention.linear_qkv.bias              [L, (nh + 2 ng) d]     (Qwen2)
    decoder.layers.self_attention.q_layernorm.weight           [L, d]        (Qwen3; k_layernorm too)
    decoder.layers.self_attention.linear_proj.weight           [L, H, nh d]
    decoder.layers.mlp.linear_fc1.layer_norm_weight            [L, H]        post_attention_layernorm
    decoder.layers.mlp.linear_fc1.weight                       [L, 2 F, H]   [gate; up]
    decoder.layers.mlp.linear_fc2.weight                       [L, H, F]
    decoder.final_layernorm.weight                             [H]
    output_layer.weight                                        [V, H]        (untied models only)
    decoder.layers.<module>._extra_state                       [L] objects   (EXTRA_STATES)

Layers are stacked on a leading axis: layer ``i`` is the shard at offset ``i`` of ``L``, as
``TransformerBlock.sharded_state_dict`` writes it. ``linear_fc1.weight`` is written as the
two halves that megatron's SwiGLU factory (``apply_swiglu_sharded_factory``) writes. Why not
build a ``GPTModel`` and call its ``sharded_state_dict``: that allocates a second copy of the
model, needs megatron's process groups and, for the Transformer Engine spec, a GPU; the
``ShardedTensor`` API is how megatron-core's own modules describe these shards, and the tests
load the result back through a real ``GPTModel.sharded_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch import Tensor

from fastmath_nemo.policy.megatron.convert import hf_to_mcore, te_names

_LAYER_PREFIX = "decoder.layers."
_FC1 = "mlp.linear_fc1.weight"
# Per-layer module state besides the weights (FP8 scaling state in Transformer Engine's
# modules; None in megatron's own): a loading model asks for every one its spec has, so all
# of the TE spec's are written, each None ("no FP8 state", which both kinds of module accept).
# A local-spec model asks for the four linears' and ignores core_attention's.
EXTRA_STATES = ("self_attention.linear_qkv", "self_attention.linear_proj", "self_attention.core_attention",
                "mlp.linear_fc1", "mlp.linear_fc2")


def _layer_shards(key: str, tensor: Tensor, layer: int, num_layers: int) -> list[ShardedTensor]:
    """Layer ``layer``'s ``tensor`` [*shape] as shard(s) of the global [L, *shape] tensor ``key``."""
    stack = (0, layer, num_layers)
    if key.endswith(_FC1):  # gate then up, as two shards of dim 1 (megatron's SwiGLU factory)
        gate, up = tensor.chunk(2, dim=0)
        return [ShardedTensor.from_rank_offsets(key, half, stack, (1, i, 2), replica_id=0, prepend_axis_num=1)
                for i, half in enumerate((gate, up))]
    return [ShardedTensor.from_rank_offsets(key, tensor, stack, replica_id=0, prepend_axis_num=1)]


def sharded_weights(
    hf_state: Mapping[str, Tensor], hf_config: Any, *, prefix: str = "", dtype: torch.dtype | None = None
) -> dict[str, ShardedTensor | ShardedObject]:
    """HF tensors -> ``{name: ShardedTensor | ShardedObject}`` for ``dist_checkpointing.save`` (one process).

    ``hf_state``: a full HF state dict or a lazy view of a folder (``lm_head.weight`` is not
    read for tied models); ``prefix`` goes before every checkpoint key (NeMo: ``"module."``);
    ``dtype``: cast every tensor (None keeps the stored dtype).
    """
    state = te_names(hf_to_mcore(hf_state, hf_config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1))
    num_layers = hf_config.num_hidden_layers
    out: dict[str, ShardedTensor | ShardedObject] = {}
    for name, tensor in state.items():
        tensor = tensor.to(dtype) if dtype is not None else tensor
        if name.startswith(_LAYER_PREFIX):
            layer, rest = name[len(_LAYER_PREFIX):].split(".", 1)
            shards = _layer_shards(prefix + _LAYER_PREFIX + rest, tensor, int(layer), num_layers)
            out.update({f"{prefix}{name}.{i}": shard for i, shard in enumerate(shards)})
        else:
            out[prefix + name] = ShardedTensor.from_rank_offsets(prefix + name, tensor, replica_id=0)
    for module in EXTRA_STATES:
        key = f"{prefix}{_LAYER_PREFIX}{module}._extra_state"
        for layer in range(num_layers):
            out[f"{key}.{layer}"] = ShardedObject(key, None, (num_layers,), (layer,), replica_id=0)
    return out
