"""The PyTorch Policy: a transformers causal LM on the CPU or one CUDA GPU.

Memory per forward, for B rows of T tokens (H hidden, V vocabulary, c =
``policy.logprob_chunk_tokens``): logprobs come from the final hidden states chunk by chunk
(``hf_logprobs.TokenLogprobs``), so at most ``c x V`` fp32 logits exist at once, never
``B x T x V``. Attention (``policy.packed_attention``): with ``per_document`` (default), rows
that are packed or padded run one causal SDPA per document (``document_attention``), O(T) per
row, no mask; full single-document rows keep the plain causal SDPA path. ``dense`` gives packed
rows the old ``[B, 1, T, T]`` per-document mask (the benchmark baseline).

The KL reference (``grpo.beta > 0``) is a host copy of the weights (``snapshot_reference``),
swapped into the model for ``reference_logprobs``: no second model on the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel

from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.documents import document_attention_mask, has_padding, is_packed
from fastmath_nemo.batching.micro_batches import MicroBatching, merge_rows, split_batch
from fastmath_nemo.batching.step_totals import reduce_step_metrics
from fastmath_nemo.checkpoint.trainer_state import TRAINER_STATE, load_trainer_state
from fastmath_nemo.config.schema import OptimizerConfig, PackedAttention
from fastmath_nemo.policy.base import LossFn
from fastmath_nemo.policy.document_attention import document_marker, enable_per_document_attention
from fastmath_nemo.policy.hf_logprobs import TokenLogprobs
from fastmath_nemo.policy.optimization import NonFiniteLossError, cosine_with_warmup, non_finite_loss
from fastmath_nemo.utils.distributed import ranks_where, world_size

logger = logging.getLogger(__name__)
# The metric key under which train_step carries each micro-batch's loss through the reduction.
_LOSS_SUM = "_loss_sum"


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision for ``dtype`` other than float32; a no-op context for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class TorchPolicy:
    """``compute_dtype=bfloat16`` runs forwards under autocast while the weights and AdamW
    states stay in float32 (mixed precision, as HF Trainer's ``bf16=True``).

    logprob_chunk_tokens: tokens per logits chunk (0 = whole rows, the ``[B, T, V]`` baseline).
    packed_attention: ``per_document`` or ``dense`` (see the module docstring).
    micro_batching: how ``logprobs`` and the stage loops split a batch (default: 16 rows at a time).
    """

    saves_collectively = False  # the whole model is on every rank: rank 0 saves alone

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        temperature: float = 1.0,
        compute_dtype: torch.dtype = torch.float32,
        *,
        logprob_chunk_tokens: int = 1024,
        packed_attention: PackedAttention = PackedAttention.per_document,
        micro_batching: MicroBatching | None = None,
    ) -> None:
        self.model = model.to(device)
        self.device = device
        self.compute_dtype = compute_dtype
        # Logprobs are those of softmax(logits / temperature), as the sampler reports them.
        self.temperature = temperature
        self.packed_attention = packed_attention
        # How logprobs() and the stage loops split a batch (policy.micro_batch_rows /
        # max_tokens_per_micro_batch, MicroBatching.of).
        self.micro_batching = micro_batching or MicroBatching()
        if packed_attention == PackedAttention.per_document:
            enable_per_document_attention(self.model)
        self._logprob_module = TokenLogprobs(self.model, temperature, logprob_chunk_tokens)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.max_grad_norm = 1.0
        # Under torchrun, training forwards go through DDP (gradients averaged over ranks).
        self._train_module: torch.nn.Module = self._logprob_module
        # Host copy of the KL reference's weights (snapshot_reference), one tensor per parameter.
        self._reference: list[torch.Tensor] | None = None

    # -- optimisation -------------------------------------------------------------------
    def setup_optimizer(self, cfg: OptimizerConfig, total_steps: int) -> None:
        # Biases and norm scales (the 1-D tensors) are not decayed, as in HF Trainer and Megatron.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda",
        )
        warmup = round(cfg.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.min_lr_ratio)
        )
        self.max_grad_norm = cfg.max_grad_norm
        if world_size() > 1 and self._train_module is self._logprob_module:
            # DDP wraps the logprob module (which owns the LM), so the forward that computes
            # the loss is DDP's own and the gradients are all-reduced.
            # broadcast_buffers=False: the only buffers are rotary frequencies, computed identically on
            # every rank; broadcasting them is a collective per forward that ranks holding
            # different numbers of micro-batches must not be made to match.
            self._train_module = torch.nn.parallel.DistributedDataParallel(self._logprob_module, broadcast_buffers=False)

    def _attention_mask(self, document_ids: torch.Tensor) -> torch.Tensor:
        """The ``attention_mask`` for rows with ``document_ids`` [B, T] (see the module docstring)."""
        packed = is_packed(document_ids)
        if self.packed_attention == PackedAttention.per_document and (packed or has_padding(document_ids)):
            return document_marker(document_ids)  # [B, 1, 1, T] on the CPU: no T x T anywhere
        if packed:
            return document_attention_mask(document_ids.to(self.device), dtype=self.compute_dtype)
        return (document_ids > 0).long().to(self.device)

    def _forward_logprobs(self, batch: Batch, module: torch.nn.Module | None = None) -> torch.Tensor:
        """[B, T] fp32 logprobs of each token given its document's prefix (column 0 is 0)."""
        mask = self._attention_mask(batch.document_ids)  # from the host copy: no device sync
        batch = batch.to(self.device)
        with autocast(self.device, self.compute_dtype):
            picked = (module or self._logprob_module)(batch.input_ids, batch.position_ids, mask)
        return torch.nn.functional.pad(picked.float(), (1, 0))

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """[B, T] logprobs of ``batch`` without gradients, on the CPU, in the batch's row order.

        Micro-batches as ``self.micro_batching`` says (by rows, or by a token budget over
        rows sorted by length).
        Positions past a row's end are 0.
        """
        micro, groups = split_batch(batch, self.micro_batching)
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self._forward_logprobs(m).cpu() for m in micro]
        finally:
            self.model.train(was_training)
        return merge_rows(parts, micro, groups, batch.num_rows, batch.width)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on the SUM of ``loss_fn`` over ``micro_batches`` (each loss is its
        micro-batch's share of the step, see ``algorithms/losses.py``), backward, clip,
        optimizer and LR step.

        Under DDP the gradients are all-reduced once, at the last micro-batch (ranks may hold
        different numbers of micro-batches), and multiplied by the world size to cancel DDP's
        mean: the step's gradient is the sum of every rank's shares. Metrics are summed over
        micro-batches and ranks (``*_max``: maxima), so ``loss`` is the whole step's loss. A
        non-finite loss on any rank raises ``NonFiniteLossError`` on every rank, before the update.
        """
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("call setup_optimizer() before train_step()")
        self.model.train()
        ddp = self._train_module if isinstance(self._train_module, torch.nn.parallel.DistributedDataParallel) else None
        # DDP divides the all-reduced gradient by the world size; the shares must add up instead.
        scale = float(world_size()) if ddp is not None else 1.0
        per_micro: list[dict[str, torch.Tensor]] = []
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                micro = micro.to(self.device)
                loss, metrics = loss_fn(self._forward_logprobs(micro, self._train_module), micro)
                # Backward even through a non-finite loss: every rank must reach the all-reduce;
                # the check below then stops all of them together.
                (loss * scale).backward()
            per_micro.append({**metrics, _LOSS_SUM: loss.detach()})
        totals = reduce_step_metrics(per_micro)  # sums over ranks: a NaN anywhere is seen everywhere
        loss_sum = totals.pop(_LOSS_SUM)
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            mine = not all(torch.isfinite(m[_LOSS_SUM]) for m in per_micro)
            raise non_finite_loss(ranks_where(mine), world_size(), {**totals, "loss": loss_sum})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {grad_norm.item()}")
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] = float(grad_norm)
        return totals

    # -- weights ------------------------------------------------------------------------
    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.model.named_parameters():
            yield name, param.detach()

    # -- KL reference --------------------------------------------------------------------
    def snapshot_reference(self) -> None:
        """Keep the current weights on the host as the KL reference (pinned on CUDA, for fast
        copies). Costs one model of host memory and no device memory; call it before resuming,
        so the reference stays the stage's initial weights."""
        pin = self.device.type == "cuda"
        with torch.no_grad():
            self._reference = [
                p.detach().to("cpu", copy=True).pin_memory() if pin else p.detach().to("cpu", copy=True)
                for p in self.model.parameters()  # tied weights appear once
            ]

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """[B, T] logprobs under the snapshot's weights, without gradients (micro-batched as
        ``logprobs``).

        The reference weights are exchanged with the training weights in place (``copy_``:
        the parameter objects the optimizer and DDP hold stay the same) and exchanged back
        afterwards, bit for bit, also when the forward raises.
        """
        if self._reference is None:
            raise RuntimeError("call snapshot_reference() before reference_logprobs()")
        self._swap_reference()
        try:
            return self.logprobs(batch)
        finally:
            self._swap_reference()

    def _swap_reference(self) -> None:
        """Exchange each parameter's values with its host copy. Only one parameter's worth of
        extra device memory at a time (the staging clone), not a second model."""
        assert self._reference is not None
        with torch.no_grad():
            for param, host in zip(self.model.parameters(), self._reference):
                staged = param.detach().clone()
                param.copy_(host)
                host.copy_(staged)

    def save(self, directory: Path, extra_state: dict | None = None, weights_only: bool = False,
             *, asynchronous: bool = False) -> None:
        """HF folder (safetensors + config) plus optimizer / scheduler (unless ``weights_only``) /
        loop state, written before this returns (one process holds the whole model: there is no
        shard to write in parallel, and validation refuses ``checkpoint.async_save`` here)."""
        self.model.save_pretrained(str(directory), safe_serialization=True)
        state = {"extra": extra_state or {}}
        if self.optimizer is not None and self.scheduler is not None and not weights_only:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        torch.save(state, Path(directory) / TRAINER_STATE)

    def load(self, directory: Path) -> dict:
        """Load weights (and optimizer state if set up); return the saved loop state."""
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(Path(directory).glob("*.safetensors")):
            weights.update(load_file(str(shard), device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"{directory}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        state_path = Path(directory) / TRAINER_STATE
        state = load_trainer_state(state_path, map_location=self.device) if state_path.exists() else {}
        if self.optimizer is not None and self.scheduler is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        return state.get("extra", {})
