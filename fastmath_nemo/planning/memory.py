"""Per-GPU memory of one training rank, as a function of the model's shape and the layout.

Pure arithmetic on integers: nothing here loads weights, imports torch or touches a device.
``docs/memory.md`` derives each term; in short, for a decoder of ``L`` layers, hidden size
``h``, ``a`` attention heads of width ``d`` (``a d`` query width), ``k`` key/value heads
(``g = k d``), MLP width ``I``, vocabulary ``V``, tensor / pipeline / context / data
parallel sizes ``t, p, c, D`` (``t p c D`` = world size), sequence parallelism ``SP``:

Parameters on the busiest rank (the first pipeline stage holds the embedding, the last one
the output layer; with ``p = 1`` one rank holds both)::

    per layer  P_l = [h (a d) + 2 h g + (a d) h + 3 h I] / t   + bias (a d + 2 g) / t (Qwen2)
                     + 2 h                                      (the two RMSNorm scales, replicated)
    embedding  P_e = V_t h / t      output layer P_o = V_t h / t  (V_t = V rounded up to a multiple of t)
    P_rank = (L / p) P_l + P_e [first stage] + P_o + h [last stage]

Static bytes (megatron's mixed precision, ``grad_reduce_in_fp32``; Adam)::

    weights    = P_rank * w          w = 2 (bf16 parameters) or 4 (fp32)
    gradients  = P_rank * 4          megatron's fp32 gradient buffer (the PyTorch backend: 4)
    optimizer  = P_rank * o / S      o = 12 (fp32 main weights + m + v) under bf16, 8 (m + v)
                                     in fp32; S = D c with the distributed optimizer, else 1

Activations of one micro-batch of ``N`` tokens (``n = N / c`` per rank), bytes of the
compute dtype ``b``, ``s = t`` with SP else 1. Kept per layer for the backward::

    A_l = b n [4 h / s + (2 a d + 2 g + 3 I) / t]
          (norm inputs and outputs; q, k, v and the attention output; SwiGLU's 2I input and I output)
    without recomputation:  A = p_f (L / p) A_l
    full recomputation:     A = p_f (L / p) b n h / s  +  A_l     (layer inputs + one layer rebuilt)

where ``p_f = p`` micro-batches are in flight on the first stage under 1F1B (1 when p = 1).
Per-document attention adds nothing quadratic; ``packed_attention=dense`` adds the
``[rows, 1, n, N]`` bool mask and one layer's fp32 score matrix ``(a / t) n N 4``.

Logprobs: the final norm's output (the output layer's input, kept for its backward), the
logits of ``C`` tokens at a time over ``V_t / t`` entries, in the compute dtype plus two fp32
buffers of the same shape (the temperature-scaled copy, the softmax kept for the backward,
then the gradient), and the output layer's fp32 weight gradient before it joins the gradient
buffer::

    logprob buffer = b n h / s + C (V_t / t) (b + 8) + 4 (V_t / t) h,   C = min(logprob_chunk_tokens, n), or n when 0

Lower-order terms (softmax statistics, rotary tables, the ``[N]`` logprob vectors) are
left out; a fixed framework overhead (CUDA context, NCCL and cuBLAS workspaces, allocator
slack) is added by the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder: the fields of a Hugging Face ``config.json``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2; Llama has none
    qk_norm: bool = False  # Qwen3
    max_positions: int = 0

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelShape":
        """From a parsed ``config.json`` (Qwen2, Qwen3, Llama)."""
        heads = int(hf["num_attention_heads"])
        return cls(
            hidden=int(hf["hidden_size"]),
            layers=int(hf["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            intermediate=int(hf["intermediate_size"]),
            vocab=int(hf["vocab_size"]),
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=hf.get("model_type") == "qwen3",
            max_positions=int(hf.get("max_position_embeddings") or 0),
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def total_params(self) -> int:
        """Every parameter of the unsharded model (one embedding if tied)."""
        return params_per_rank(self, Layout(world=1))

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token over all layers (unsharded)."""
        return 2 * self.layers * self.kv_width * dtype_bytes


# DeepSeek-R1-Distill-Qwen-14B's config.json (Qwen2), for plans made without the model folder.
BUILTIN_SHAPES: dict[str, ModelShape] = {
    "DeepSeek-R1-Distill-Qwen-14B": ModelShape(
        hidden=5120, layers=48, heads=40, kv_heads=8, head_dim=128, intermediate=13824, vocab=152064,
        tied_embeddings=False, qkv_bias=True, max_positions=131072,
    ),
}


@dataclass(frozen=True)
class Layout:
    """World size and the model-parallel split; data parallelism is what is left over."""

    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter: weights, gradient buffer, optimizer states (incl. main weights)."""

    weight: int
    grad: int
    optimizer: int
    activation: int  # bytes per activation element (the compute dtype)

    @classmethod
    def megatron(cls, dtype: str) -> "Precision":
        """bf16 parameters with fp32 main weights in the optimizer, or fp32 throughout."""
        return cls(2, 4, 12, 2) if dtype == "bfloat16" else cls(4, 4, 8, 4)

    @classmethod
    def torch(cls, dtype: str) -> "Precision":
        """The PyTorch backend keeps fp32 weights and AdamW states; bf16 is autocast compute."""
        return cls(4, 4, 8, 2 if dtype == "bfloat16" else 4)


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of TP (as ``policy.megatron.convert`` pads it)."""
    return -(-vocab // tp) * tp


def layer_params(shape: ModelShape, tp: int) -> int:
    """One decoder layer's parameters on one TP rank (norm scales are replicated)."""
    h, q, g, inter = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    sharded = h * q + 2 * h * g + q * h + 3 * h * inter + ((q + 2 * g) if shape.qkv_bias else 0)
    replicated = 2 * h + (2 * shape.head_dim if shape.qk_norm else 0)
    return sharded // tp + replicated


def params_per_rank(shape: ModelShape, layout: Layout) -> int:
    """Parameters of the busiest pipeline stage on one TP rank (see the module docstring)."""
    tp, pp = layout.tp, layout.pp
    embedding = padded_vocab(shape.vocab, tp) * shape.hidden // tp
    layers = shape.layers // pp * layer_params(shape, tp)
    # The last stage holds the output layer; tied embeddings share the first stage's table
    # when both are on one rank (megatron keeps a copy on the last stage otherwise).
    output = 0 if shape.tied_embeddings and pp == 1 else embedding
    first = layers + embedding + (output + shape.hidden if pp == 1 else 0)
    last = layers + output + shape.hidden
    return max(first, last)


def static_bytes(shape: ModelShape, layout: Layout, precision: Precision, distributed_optimizer: bool) -> dict[str, int]:
    """Weights, gradients and optimizer states of one rank, in bytes."""
    params = params_per_rank(shape, layout)
    shards = layout.dp * layout.cp if distributed_optimizer else 1
    return {
        "weights": params * precision.weight,
        "gradients": params * precision.grad,
        "optimizer": params * precision.optimizer // shards,
    }


def layer_activation_bytes(shape: ModelShape, layout: Layout, tokens: int, dtype_bytes: int) -> int:
    """``A_l``: what one layer keeps for its backward for ``tokens`` tokens of a micro-batch."""
    n = tokens // layout.cp
    seq_shard = layout.tp if layout.sequence_parallel else 1
    h, q, g, inter = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return dtype_bytes * n * (4 * h // seq_shard + (2 * q + 2 * g + 3 * inter) // layout.tp)


def activation_bytes(
    shape: ModelShape, layout: Layout, tokens: int, dtype_bytes: int, *, recompute: bool,
    dense_rows: int = 0, row_tokens: int = 0,
) -> int:
    """Activations of one micro-batch of ``tokens`` tokens held at the peak of its backward.

    ``dense_rows`` > 0: packed rows of ``row_tokens`` under ``packed_attention=dense`` add
    their ``[rows, n, T]`` bool mask and one layer's fp32 score matrix.
    """
    per_layer = layer_activation_bytes(shape, layout, tokens, dtype_bytes)
    in_flight = layout.pp  # 1F1B: the first stage holds p micro-batches' activations
    layers = shape.layers // layout.pp
    if recompute:
        seq_shard = layout.tp if layout.sequence_parallel else 1
        inputs = dtype_bytes * (tokens // layout.cp) * shape.hidden // seq_shard
        total = in_flight * layers * inputs + per_layer
    else:
        total = in_flight * layers * per_layer
    if dense_rows:
        local = row_tokens // layout.cp
        total += dense_rows * local * row_tokens * (1 + 4 * shape.heads // layout.tp)
    return total


def logprob_bytes(shape: ModelShape, layout: Layout, tokens: int, chunk_tokens: int, dtype_bytes: int) -> int:
    """The output layer's input, its logits with their fp32 buffers and its fp32 weight
    gradient for one micro-batch (``chunk_tokens`` = 0: logits of all ``tokens / c`` positions
    at once)."""
    n = tokens // layout.cp
    seq_shard = layout.tp if layout.sequence_parallel else 1
    rows = n if chunk_tokens == 0 else min(chunk_tokens, n)
    vocab_local = padded_vocab(shape.vocab, layout.tp) // layout.tp
    hidden = dtype_bytes * n * shape.hidden // seq_shard
    return hidden + rows * vocab_local * (dtype_bytes + 8) + 4 * vocab_local * shape.hidden


def vllm_kv_tokens(shape: ModelShape, budget_bytes: float, tp: int, dtype_bytes: int = 2) -> int:
    """Tokens of KV cache one engine holds when each of its ``tp`` ranks has ``budget_bytes``
    left for weights and cache (its share minus its weight shard); 0 if the weights do not fit."""
    weights = shape.total_params() * dtype_bytes / tp
    free = budget_bytes - weights
    return max(0, int(free // (shape.kv_cache_bytes_per_token(dtype_bytes) / tp)))
