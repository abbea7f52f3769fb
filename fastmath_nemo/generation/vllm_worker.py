"""Methods vLLM mixes into its workers (``worker_extension_cls``), called through
``LLM.collective_rpc`` from the trainer's process."""

from __future__ import annotations

import torch


def pack_tensor(tensor: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """A tensor as (raw bytes, dtype name, shape): vLLM's RPC serialiser turns tensors into
    nested lists, but sends bytes as they are."""
    flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return flat.numpy().tobytes(), str(tensor.dtype).removeprefix("torch."), list(tensor.shape)


def unpack_tensor(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape)


class WorkerExtension:
    """What ``VLLMGenerator`` mixes into vLLM's workers (``self`` is a vLLM worker)."""

    def load_weight_bucket(self, names: list[str], packed: list[tuple[bytes, str, list[int]]]) -> None:
        """Refit for engines whose workers live in other processes (TP > 1, or
        ``VLLM_ENABLE_V1_MULTIPROCESSING=1``): one bucket of packed tensors per call."""
        weights = [(name, unpack_tensor(*p)) for name, p in zip(names, packed)]
        self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]

    def set_logit_temperature(self, temperature: float) -> None:
        """Divide the model's logits by ``temperature`` in its ``LogitsProcessor`` (whose
        ``scale`` multiplies the logits after the output head, before vLLM's sampler), so
        that ``logprobs_mode="raw_logprobs"`` reports ``log softmax(logits / temperature)``:
        vLLM has no mode for the tempered, untruncated logprobs the trainer computes."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        head = getattr(model, "logits_processor", None)
        if head is None or not hasattr(head, "scale"):
            raise RuntimeError(f"vLLM model {type(model).__name__} has no logits_processor.scale to fold the "
                               "sampling temperature into; rollout logprobs would not be the trainer's")
        if not hasattr(head, "fastmath_model_scale"):  # the model's own scale (e.g. a config's logit_scale)
            head.fastmath_model_scale = head.scale
        head.scale = head.fastmath_model_scale / temperature

    def refresh_tied_lm_head(self) -> bool:
        """After a reload, re-derive what vLLM computed from the tied output head's weight.

        With tied embeddings the output head (``lm_head``) shares the embedding's weight and
        is never loaded itself, so the reload restores its old derived tensors: on CPU, the
        GEMM kernel's pre-packed copy of the weight. The stale copy made logits wrong after
        every refit (max logprob error 1e-2 for a perturbed embedding; found by comparing with
        the trainer). Redoing the layer's weight processing re-packs the new weight.
        """
        model = self.model_runner.model  # type: ignore[attr-defined]
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
            return False
        head.quant_method.process_weights_after_loading(head)
        return True
