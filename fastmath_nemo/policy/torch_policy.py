"""The PyTorch Policy: a transformers causal LM on the CPU or one CUDA GPU.

Packed rows (several documents per row) get a 4D per-document causal mask; rows with a
single document get the ordinary 2D padding mask, which keeps the fast SDPA kernels.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel

from fastmath_nemo.batch import Batch
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.data.packing import document_attention_mask
from fastmath_nemo.policy.base import LossFn
from fastmath_nemo.utils.distributed import world_size

logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.pt"


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision for ``dtype`` other than float32; a no-op context for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step, so the weights and the last checkpoint stay good."""


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TorchPolicy:
    """``compute_dtype=bfloat16`` runs forwards under autocast while the weights and AdamW
    states stay in float32 (mixed precision, as HF Trainer's ``bf16=True``)."""

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        temperature: float = 1.0,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model.to(device)
        self.device = device
        self.compute_dtype = compute_dtype
        # Logprobs are those of softmax(logits / temperature), as the sampler reports them.
        self.temperature = temperature
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.max_grad_norm = 1.0
        # Under torchrun, training forwards go through DDP (gradients averaged over ranks).
        self._train_module: torch.nn.Module = self.model

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
        if world_size() > 1 and self._train_module is self.model:
            self._train_module = torch.nn.parallel.DistributedDataParallel(self.model)

    def _forward_logprobs(self, batch: Batch, module: torch.nn.Module | None = None) -> torch.Tensor:
        """[B, T] logprobs of each token given its document's prefix (column 0 is 0)."""
        batch = batch.to(self.device)
        packed = bool((batch.document_ids.max(dim=-1).values > 1).any())
        if packed:
            mask = document_attention_mask(batch.document_ids, dtype=self.compute_dtype)
        else:
            mask = (batch.document_ids > 0).long()
        with autocast(self.device, self.compute_dtype):
            logits = (module or self.model)(
                input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
            ).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        picked = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        return torch.nn.functional.pad(picked, (1, 0))

    @torch.no_grad()
    def logprobs(self, batch: Batch, micro_batch_rows: int = 64) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [
                self._forward_logprobs(batch.select(slice(i, i + micro_batch_rows))).cpu()
                for i in range(0, batch.num_rows, micro_batch_rows)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(parts)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """Mean of ``loss_fn`` over micro-batches, backward, clip, optimizer and LR step."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("call setup_optimizer() before train_step()")
        self.model.train()
        totals: dict[str, float] = {}
        for micro in micro_batches:
            micro = micro.to(self.device)
            loss, metrics = loss_fn(self._forward_logprobs(micro, self._train_module), micro)
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"loss is {loss.item()} (metrics: { {k: float(v) for k, v in metrics.items()} })")
            (loss / len(micro_batches)).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) / len(micro_batches)
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

    def frozen_copy(self) -> "TorchPolicy":
        """A reference policy for the KL term: same weights, no optimizer, no gradients."""
        model = copy.deepcopy(self.model).eval()
        model.requires_grad_(False)
        return TorchPolicy(model, self.device, self.temperature, self.compute_dtype)

    def save(self, directory: Path, extra_state: dict | None = None) -> None:
        """HF folder (safetensors + config) plus optimizer / scheduler / loop state."""
        self.model.save_pretrained(str(directory), safe_serialization=True)
        state = {"extra": extra_state or {}}
        if self.optimizer is not None and self.scheduler is not None:
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
        state = torch.load(state_path, map_location=self.device, weights_only=False) if state_path.exists() else {}
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[union-attr]
        return state.get("extra", {})
