"""Weights between Hugging Face (Qwen2 / Qwen3 / Llama) and megatron-core ``GPTModel``, per rank.

Megatron names are those of ``GPTModel.state_dict()`` with the local layer spec (0.16.1):

=========================================================  ===========================================
megatron (this rank; ``j`` = layer index within the stage)   Hugging Face / TP split
=========================================================  ===========================================
``embedding.word_embeddings.weight``  (first stage)         ``model.embed_tokens.weight``, vocab dim
``decoder.layers.j.input_layernorm.weight``                 ``...input_layernorm.weight``, replicated
``decoder.layers.j.self_attention.linear_qkv.weight|bias``  ``q/k/v_proj``, fused per query group
``decoder.layers.j.self_attention.q_layernorm.weight``      ``self_attn.q_norm.weight`` (Qwen3)
``decoder.layers.j.self_attention.k_layernorm.weight``      ``self_attn.k_norm.weight`` (Qwen3)
``decoder.layers.j.self_attention.linear_proj.weight``      ``o_proj``, input dim (row parallel)
``decoder.layers.j.pre_mlp_layernorm.weight``               ``post_attention_layernorm.weight``
``decoder.layers.j.mlp.linear_fc1.weight``                  ``[gate_shard; up_shard]`` per rank
``decoder.layers.j.mlp.linear_fc2.weight``                  ``down_proj``, input dim (row parallel)
``decoder.final_layernorm.weight``  (last stage)            ``model.norm.weight``
``output_layer.weight``  (last stage)                       ``lm_head.weight`` (tied: the embedding,
                                                            on a last stage that is not also first)
=========================================================  ===========================================

The fused QKV rows are megatron's GQA-interleaved layout: for each query group, its
``heads / groups`` query heads, then its key head, then its value head; TP rank ``r`` holds
groups ``[r * g / tp, (r + 1) * g / tp)``. Stage ``p`` holds global layers
``[p * L / pp, (p + 1) * L / pp)``. Megatron-core pads nothing itself; when the vocabulary is
not divisible by TP it is padded here with zero rows (:func:`padded_vocab_size`), and those
logit columns must be dropped (or masked) by whoever reads the logits.
Transformer Engine's layer spec fuses the two pre-norms into the following linears
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); :func:`te_names` renames.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastmath_nemo.policy.megatron.config import head_dim

# Layer-relative megatron name -> HF name within ``model.layers.{i}.``: replicated norms ...
_LAYER_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
# ... and row-parallel linears (TP splits the input dim, 1) ...
_ROW_PARALLEL = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# ... and column-parallel composites (TP splits dim 0 after fusing).
_QKV_W, _QKV_B, _FC1 = "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight"
_TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of TP (``VocabParallelEmbedding`` needs equal shards)."""
    return -(-vocab_size // tp_size) * tp_size


def _layers_per_stage(hf_config: Any, pp_size: int) -> int:
    layers = hf_config.num_hidden_layers
    if layers % pp_size:
        raise ValueError(f"num_hidden_layers ({layers}) must be divisible by pipeline parallel size ({pp_size})")
    return layers // pp_size


def _heads(hf_config: Any) -> tuple[int, int, int]:
    """(query heads, query groups, head dim)."""
    return hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config)


def _vocab_shard(weight: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """weight [V, H] -> this rank's [V_pad / tp, H] (zero rows pad V to a multiple of tp)."""
    padded = padded_vocab_size(weight.size(0), tp_size)
    if padded != weight.size(0):
        weight = torch.cat([weight, weight.new_zeros(padded - weight.size(0), *weight.shape[1:])])
    return weight.chunk(tp_size, dim=0)[tp_rank]


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, hf_config: Any, tp_rank: int, tp_size: int) -> Tensor:
    """q [nh*d, ...], k/v [ng*d, ...] -> this rank's [ng/tp * (nh/ng + 2) * d, ...] (weight or bias)."""
    nh, ng, d = _heads(hf_config)
    rest = q.shape[1:]
    fused = torch.cat(
        [q.reshape(ng, nh // ng * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1
    )  # [ng, (nh/ng + 2) * d, ...]
    return fused.chunk(tp_size, dim=0)[tp_rank].reshape(-1, *rest)


def _split_qkv(shards: list[Tensor], hf_config: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`_fuse_qkv` over all TP ranks' shards: (q, k, v) in HF layout."""
    nh, ng, d = _heads(hf_config)
    rest = shards[0].shape[1:]
    fused = torch.cat(shards, dim=0).reshape(ng, (nh // ng + 2) * d, *rest)
    q, k, v = fused.split([nh // ng * d, d, d], dim=1)
    return q.reshape(nh * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)


def layer_to_mcore(
    hf_state: Mapping[str, Tensor], layer: int, hf_config: Any, *, tp_rank: int, tp_size: int
) -> dict[str, Tensor]:
    """Global HF layer ``layer`` -> this TP rank's tensors, keyed relative to the megatron layer."""
    hf = f"model.layers.{layer}."
    out: dict[str, Tensor] = {}
    for name, hf_name in _LAYER_NORMS.items():
        if hf + hf_name in hf_state:  # q/k norms exist for Qwen3 only
            out[name] = hf_state[hf + hf_name]
    for name, hf_name in _ROW_PARALLEL.items():
        out[name] = hf_state[hf + hf_name].chunk(tp_size, dim=1)[tp_rank]
    attn = hf + "self_attn."
    out[_QKV_W] = _fuse_qkv(*(hf_state[f"{attn}{p}_proj.weight"] for p in "qkv"), hf_config, tp_rank, tp_size)
    if attn + "q_proj.bias" in hf_state:
        out[_QKV_B] = _fuse_qkv(*(hf_state[f"{attn}{p}_proj.bias"] for p in "qkv"), hf_config, tp_rank, tp_size)
    gate, up = (hf_state[f"{hf}mlp.{p}_proj.weight"].chunk(tp_size, dim=0)[tp_rank] for p in ("gate", "up"))
    out[_FC1] = torch.cat([gate, up], dim=0)
    return out


def layer_to_hf(shards: list[Mapping[str, Tensor]], layer: int, hf_config: Any) -> dict[str, Tensor]:
    """All TP ranks' layer-relative tensors (rank order) -> HF tensors of global layer ``layer``."""
    out: dict[str, Tensor] = {}
    for name in shards[0]:
        out.update(layer_tensor_to_hf(name, [s[name] for s in shards], layer, hf_config))
    return out


def layer_tensor_to_hf(name: str, shards: list[Tensor], layer: int, hf_config: Any) -> dict[str, Tensor]:
    """One layer-relative megatron tensor from all TP ranks (rank order) -> its HF tensors:
    fused QKV -> q/k/v, fc1 -> gate/up, row-parallel shards concatenated, norms as they are."""
    hf = f"model.layers.{layer}."
    if name in _LAYER_NORMS:
        return {hf + _LAYER_NORMS[name]: shards[0]}
    if name in (_QKV_W, _QKV_B):
        kind = "weight" if name == _QKV_W else "bias"
        return {f"{hf}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", _split_qkv(shards, hf_config))}
    if name in _ROW_PARALLEL:
        return {hf + _ROW_PARALLEL[name]: torch.cat(shards, dim=1)}
    if name == _FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {f"{hf}mlp.gate_proj.weight": torch.cat([g for g, _ in halves], dim=0),
                f"{hf}mlp.up_proj.weight": torch.cat([u for _, u in halves], dim=0)}
    raise KeyError(f"no Hugging Face name for the megatron layer tensor {name!r}")


def hf_to_mcore(
    hf_state: Mapping[str, Tensor], hf_config: Any, *, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int
) -> dict[str, Tensor]:
    """This (TP, PP) rank's megatron state dict (no ``_extra_state``) from a full HF state dict.

    ``hf_state`` may be any mapping (e.g. a lazy safetensors reader): only the keys this rank
    needs are read. ``lm_head.weight`` is ignored for tied models.
    """
    per_stage = _layers_per_stage(hf_config, pp_size)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    tied = bool(hf_config.tie_word_embeddings)
    out: dict[str, Tensor] = {}
    if first:
        out["embedding.word_embeddings.weight"] = _vocab_shard(hf_state["model.embed_tokens.weight"], tp_rank, tp_size)
    for local in range(per_stage):
        tensors = layer_to_mcore(hf_state, pp_rank * per_stage + local, hf_config, tp_rank=tp_rank, tp_size=tp_size)
        out.update({f"decoder.layers.{local}.{k}": v for k, v in tensors.items()})
    if last:
        out["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"]
        if not tied:
            out["output_layer.weight"] = _vocab_shard(hf_state["lm_head.weight"], tp_rank, tp_size)
        elif not first:
            # A last stage without the embedding keeps its own copy of the tied matrix.
            out["output_layer.weight"] = _vocab_shard(hf_state["model.embed_tokens.weight"], tp_rank, tp_size)
    return out


def mcore_to_hf(
    tp_states: list[Mapping[str, Tensor]], hf_config: Any, *, pp_rank: int, pp_size: int
) -> dict[str, Tensor]:
    """The HF tensors held by one PP stage, from its TP ranks' megatron state dicts (rank order).

    Inverse of :func:`hf_to_mcore` (bit-exact): vocab padding is dropped; a tied model yields
    ``model.embed_tokens.weight`` from the first stage only (no ``lm_head.weight``).
    """
    per_stage = _layers_per_stage(hf_config, pp_size)
    vocab = hf_config.vocab_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    tp_states = [te_names(s, to_te=False) for s in tp_states]  # accept TE-spec names too
    out: dict[str, Tensor] = {}
    if first:
        out["model.embed_tokens.weight"] = torch.cat([s["embedding.word_embeddings.weight"] for s in tp_states])[:vocab]
    for local in range(per_stage):
        prefix = f"decoder.layers.{local}."
        shards = [{k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)} for s in tp_states]
        out.update(layer_to_hf(shards, pp_rank * per_stage + local, hf_config))
    if last:
        out["model.norm.weight"] = tp_states[0]["decoder.final_layernorm.weight"]
        if not hf_config.tie_word_embeddings:
            out["lm_head.weight"] = torch.cat([s["output_layer.weight"] for s in tp_states])[:vocab]
    return out


def te_names(state: Mapping[str, Tensor], *, to_te: bool = True) -> dict[str, Tensor]:
    """Rename the pre-norms between the local spec and TE's fused-norm spec (either way)."""
    pairs = _TE_RENAMES.items() if to_te else [(b, a) for a, b in _TE_RENAMES.items()]
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.endswith("." + old) or key == old:
                key = key[: len(key) - len(old)] + new
                break
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Gathering a sharded model back to HF tensors (export, vLLM refit): one unit at a time.
# ---------------------------------------------------------------------------------------------

# Tensors that differ across TP ranks (everything else is replicated and not communicated).
_TP_SHARDED = frozenset(
    {"embedding.word_embeddings.weight", "output_layer.weight", _QKV_W, _QKV_B, _FC1, *_ROW_PARALLEL}
)


def _tp_gather(local: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
    """This stage's tensors from every TP rank (rank order); replicated tensors are not sent."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return [dict(local)]
    group = parallel_state.get_tensor_model_parallel_group()
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp_size)]
    for key, tensor in local.items():
        if key in _TP_SHARDED:  # keys are layer-relative or embedding/output names
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
        else:
            parts = [tensor] * tp_size
        for shard, part in zip(shards, parts):
            shard[key] = part
    return shards


def _pp_broadcast(tensors: dict[str, Tensor] | None, owner_stage: int) -> dict[str, Tensor]:
    """Send ``owner_stage``'s HF tensors to every stage of this rank's pipeline group."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        assert tensors is not None
        return tensors
    group = parallel_state.get_pipeline_model_parallel_group()
    src = dist.get_process_group_ranks(group)[owner_stage]
    meta = [[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()] if tensors is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    out = {}
    for key, shape, dtype in meta[0]:
        buf = tensors[key].contiguous() if tensors is not None else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(buf, src=src, group=group)
        out[key] = buf
    return out


def _local_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """A module's state dict without ``_extra_state`` entries and with local-spec names."""
    state = {k: v.detach() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    return te_names(state, to_te=False)


def gather_hf_weights(model: torch.nn.Module, hf_config: Any) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(hf_name, full tensor)`` on every rank, one megatron tensor at a time (the
    embedding; each layer's norms, fused QKV, projections, fused gate/up; the head).

    A collective: every rank of the TP x PP grid must iterate it to the end, in step. The owning
    stage all-gathers one tensor's TP shards and converts it (unfusing QKV and gate/up); the HF
    tensors are then broadcast over the pipeline group, so beyond what the consumer keeps
    (vLLM's refit: one bucket) only one full tensor is alive at a time. Tied models yield
    ``model.embed_tokens.weight`` only. Without TP/PP the tensors may be views of the model's
    parameters: copy before modifying them.
    """
    from megatron.core import parallel_state

    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = _layers_per_stage(hf_config, pp_size)
    vocab = hf_config.vocab_size

    def unit(owner: int, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        return _pp_broadcast(build() if pp_rank == owner else None, owner)

    def embedding() -> dict[str, Tensor]:
        shards = _tp_gather({"embedding.word_embeddings.weight": model.embedding.word_embeddings.weight.detach()})
        full = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
        return {"model.embed_tokens.weight": full[:vocab]}

    def decoder_tensor(layer: int, local: int, key: str) -> dict[str, Tensor]:
        shards = _tp_gather({key: _local_tensors(model.decoder.layers[local])[key]})
        return layer_tensor_to_hf(key, [s[key] for s in shards], layer, hf_config)

    def head() -> dict[str, Tensor]:
        out = {"model.norm.weight": _local_tensors(model.decoder.final_layernorm)["weight"]}
        if not hf_config.tie_word_embeddings:
            shards = _tp_gather({"output_layer.weight": model.output_layer.weight.detach()})
            out["lm_head.weight"] = torch.cat([s["output_layer.weight"] for s in shards])[:vocab]
        return out

    yield from unit(0, embedding).items()
    keys = list(_local_tensors(model.decoder.layers[0]))  # every layer's (and every stage's) keys
    for layer in range(hf_config.num_hidden_layers):
        owner, local = divmod(layer, per_stage)
        for key in keys:
            yield from unit(owner, functools.partial(decoder_tensor, layer, local, key)).items()
    yield from unit(pp_size - 1, head).items()


def hf_weight_layout(model: torch.nn.Module, hf_config: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(hf_name, dtype, shape)`` of every tensor :func:`gather_hf_weights` yields, in its
    order, from this rank's modules alone: its conversion runs on meta tensors (no memory, no
    communication). Every layer has the first local layer's tensors; the first stage's embedding
    stands for the output layer (the same dtype and shape) where this rank holds neither the
    last stage nor tied weights, and its layers' norms for the final norm."""
    from megatron.core import parallel_state

    while hasattr(model, "module"):
        model = model.module
    tp = parallel_state.get_tensor_model_parallel_world_size()
    vocab = hf_config.vocab_size

    def meta(tensor: Tensor) -> list[Tensor]:
        return [torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")] * tp

    def vocab_table(shards: list[Tensor]) -> Tensor:
        return torch.cat(shards)[:vocab]

    layer = _local_tensors(model.decoder.layers[0])
    table = model.embedding.word_embeddings.weight if getattr(model, "embedding", None) is not None \
        else model.output_layer.weight
    norm = next(t for name, t in layer.items() if name in _LAYER_NORMS)
    out = [("model.embed_tokens.weight", vocab_table(meta(table)))]
    for index in range(hf_config.num_hidden_layers):
        for key, tensor in layer.items():
            out += list(layer_tensor_to_hf(key, meta(tensor), index, hf_config).items())
    out.append(("model.norm.weight", torch.empty(norm.shape, dtype=norm.dtype, device="meta")))
    if not hf_config.tie_word_embeddings:
        head = model.output_layer.weight if getattr(model, "output_layer", None) is not None else table
        out.append(("lm_head.weight", vocab_table(meta(head))))
    return [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in out]
