"""The Megatron Policy: a megatron-core GPTModel with tensor, pipeline, context and data parallelism.

Built from a Hugging Face checkpoint (``convert.py``), trained through megatron-core's own
machinery: ``get_forward_backward_func`` (pipeline schedules over micro-batches), its
``DistributedDataParallel`` (gradient buffers, all-reduce over data-parallel ranks) and its
optimizer (``get_megatron_optimizer``: AdamW, fp32 main weights under bf16, gradient
clipping by the global norm, optionally sharded over data-parallel ranks). The SFT and GRPO
loss functions are the same pure functions the PyTorch policy calls; they receive
per-token logprobs computed without ever gathering the vocabulary, from the final hidden
states a chunk of tokens at a time (``logprobs.py``; ``logprob_chunk_tokens=0``: from
whole-row logits, :func:`token_logprobs`). Packed rows attend per document (one SDPA call
per document, ``document_attention.py``; ``packed_attention="dense"``: a per-row mask).
The KL term's reference policy is a host copy of the weights swapped into the same model
(:meth:`MegatronPolicy.snapshot_reference`), not a second model.

Every rank runs the same stage loop; data is sharded over data-parallel ranks only
(``utils.distributed.data_parallel_*``): tensor-, context- and pipeline-parallel peers see
the same rows (context-parallel ranks then take their own positions of each row). Results
that only the last pipeline stage has (logprobs, loss metrics) are broadcast to the other
stages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.documents import blocked_attention, is_packed
from fastmath_nemo.batching.micro_batches import MicroBatching, merge_rows, split_batch
from fastmath_nemo.batching.step_totals import reduce_step_metrics
from fastmath_nemo.checkpoint.safetensors_stream import TensorSpec
from fastmath_nemo.checkpoint.trainer_state import TRAINER_STATE, load_trainer_state
from fastmath_nemo.config.schema import MegatronConfig, OptimizerConfig, PackedAttention
from fastmath_nemo.policy.base import LossFn
from fastmath_nemo.policy.megatron.writer_queue import tie_results_queue_to_trainer
from fastmath_nemo.policy.megatron.checkpointing import (
    QueuedWrite,
    is_distributed_checkpoint,
    read_distributed,
    write_distributed,
    write_hf_weights,
)
from fastmath_nemo.policy.megatron.config import transformer_config_from_hf
from fastmath_nemo.policy.megatron.context_parallel import gather_logprobs, local_positions
from fastmath_nemo.policy.megatron.convert import gather_hf_weights, hf_weight_layout
from fastmath_nemo.policy.megatron.cpu_compat import enable_cpu_compat
from fastmath_nemo.policy.megatron.layer_spec import choose_layer_spec, gpt_layer_spec
from fastmath_nemo.policy.megatron.logprobs import chunked_logprobs
from fastmath_nemo.policy.megatron.model import build_gpt_model, load_hf_weights
from fastmath_nemo.policy.megatron.optimizer_state import checkpoint_metadata, finish_load, prepare_for_load
from fastmath_nemo.policy.megatron.parallel import init_model_parallel
from fastmath_nemo.policy.megatron.thd import thd_params
from fastmath_nemo.policy.optimization import NonFiniteLossError, cosine_with_warmup, non_finite_loss
from fastmath_nemo.utils.distributed import (
    barrier,
    broadcast_object,
    data_parallel_size,
    every_rank,
    is_rank0,
    ranks_where,
    register_model_replicas,
    set_data_parallel_group,
    world_size,
)

logger = logging.getLogger(__name__)
_LOSS_SUM = "_loss_sum"  # each micro-batch's loss, carried through the metric reduction


def next_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Vocab-parallel ``log softmax(logits[:, t] / temperature)[targets[:, t]]``.

    logits:  [B, S, V_local] this TP rank's slice of the (padded) vocabulary
    targets: [B, S] the token that follows each position
    returns  [B, S]

    megatron-core's ``vocab_parallel_cross_entropy`` all-reduces the max and the partition
    sum over TP ranks, so no rank materialises the full vocabulary. Vocabulary padding added
    to make it divisible by TP is masked out of the partition sum.
    """
    from megatron.core import parallel_state, tensor_parallel

    scaled = logits.float() / temperature  # a fresh tensor: the op overwrites its input
    local = scaled.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    if start + local > vocab_size:
        scaled[..., max(0, vocab_size - start):] = float("-inf")
    return -tensor_parallel.vocab_parallel_cross_entropy(scaled, targets.contiguous())


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Logprobs in :class:`~fastmath_nemo.batching.batch.Batch` alignment: logits [B, T, V_local],
    input_ids [B, T] -> [B, T], ``log p(input_ids[:, t] | input_ids[:, :t])``, column 0 = 0."""
    logprobs = next_token_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size, temperature)
    return torch.nn.functional.pad(logprobs, (1, 0))


class MegatronPolicy:
    """``policy.backend=megatron``. ``params_dtype=bfloat16`` keeps fp32 main weights in the
    optimizer (megatron's mixed precision); float32 trains in full precision."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: MegatronConfig,
        *,
        temperature: float = 1.0,
        params_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        logprob_chunk_tokens: int = 1024,
        packed_attention: PackedAttention = PackedAttention.per_document,
        micro_batching: MicroBatching | None = None,
    ) -> None:
        """``logprob_chunk_tokens`` and ``packed_attention`` are ``policy.*`` keys (schema.py);
        ``micro_batching`` (``MicroBatching.of(cfg.policy)``) is how ``logprobs`` and the stage
        loops split a batch."""
        self.micro_batching = micro_batching or MicroBatching()
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            enable_cpu_compat()
        init_model_parallel(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, seed, cfg.context_parallel_size)
        from megatron.core import parallel_state

        # rows are sharded over data-parallel ranks; context-parallel peers share theirs, and the
        # ranks of one replica split the work done on its rows (answer verification)
        set_data_parallel_group(parallel_state.get_data_parallel_group())
        register_model_replicas()
        self._cp_rank = parallel_state.get_context_parallel_rank()
        self.model_dir = Path(model_dir)
        self.seed = seed
        self.cfg = cfg
        self.temperature = temperature
        self.params_dtype = params_dtype
        self.hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        self.tcfg = transformer_config_from_hf(
            self.hf_config, tp=cfg.tensor_parallel_size, pp=cfg.pipeline_parallel_size, cp=cfg.context_parallel_size,
            params_dtype=params_dtype, sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute_activations,
        )
        # Transformer Engine, FP8 and the attention path: layer_spec.py decides (and refuses what
        # cannot run here, as validation did before any work started).
        choice = choose_layer_spec(cfg)
        choice.configure(self.tcfg)
        spec = gpt_layer_spec(choice.attention, qk_layernorm=self.hf_config.model_type == "qwen3")
        self.packed_format = choice.packed_format  # a per-row document mask, or megatron's thd
        self.per_document = choice.per_document(packed_attention)
        model = build_gpt_model(self.hf_config, self.tcfg, spec)
        if self.on_gpu:
            model.cuda(torch.cuda.current_device())
        from_checkpoint = is_distributed_checkpoint(Path(model_dir))  # a resumable step_N: no HF weights
        if not from_checkpoint:
            load_hf_weights(model, model_dir, self.hf_config)
        self.model = model
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self._reference: list[torch.Tensor] | None = None  # snapshot_reference's host copy
        self._stash: list[torch.Tensor] = []  # the training weights during a reference forward
        self.ddp = DistributedDataParallel(
            self.tcfg,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=cfg.distributed_optimizer),
            model,
        )
        self.tcfg.finalize_model_grads_func = finalize_model_grads  # DP all-reduce, tied-embedding sync
        self.optimizer: Any = None
        self.base_lr = 0.0
        self.weight_decay = 0.0
        self.schedule: tuple[int, int, float] = (1, 0, 0.0)  # total steps, warmup, min ratio
        self.step = 0
        self._async_writes: Any = None  # megatron-core's AsyncCallsQueue, made by the first async save
        if from_checkpoint:  # its weights, resharded to this layout (TP=1 in one process for an export)
            self.load(Path(model_dir))

    @property
    def logprob_chunk_tokens(self) -> int:
        """Tokens per chunk of the logprobs from hidden states; 0: from whole-row logits."""
        return self._logprob_chunk_tokens

    @logprob_chunk_tokens.setter
    def logprob_chunk_tokens(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"logprob_chunk_tokens must be >= 0, got {value}")
        self._logprob_chunk_tokens = value
        self.model.return_hidden = value > 0  # the last stage then returns hidden states

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")

    # -- optimisation ------------------------------------------------------------------------
    def setup_optimizer(self, cfg: OptimizerConfig, total_steps: int) -> None:
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
                adam_beta2=cfg.betas[1], adam_eps=cfg.eps, clip_grad=cfg.max_grad_norm, bf16=self.params_dtype == torch.bfloat16,
                params_dtype=self.params_dtype, use_distributed_optimizer=self.cfg.distributed_optimizer,
            ),
            [self.ddp],
        )
        self.base_lr = cfg.lr
        self.weight_decay = cfg.weight_decay
        self.schedule = (total_steps, round(cfg.warmup_ratio * total_steps), cfg.min_lr_ratio)
        self.step = 0

    def _set_lr(self) -> float:
        total, warmup, min_ratio = self.schedule
        lr = self.base_lr * cosine_with_warmup(self.step, total, warmup, min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # megatron's groups carry wd_mult (0 for biases and norm scales); its own scheduler,
            # which we replace by the PyTorch policy's schedule, is what applies it
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        return lr

    # -- forward -----------------------------------------------------------------------------
    def _uses_thd(self, micro_batches: list[Batch]) -> bool:
        """Whether this pass feeds rows in the thd format: always for Transformer Engine; for
        packed rows on the per-document path without context parallelism, where megatron's
        RoPE then restarts at each document as the Batch's position ids do (in the [s, b]
        layout it takes row positions, the same angles only in exact arithmetic: at 24k
        tokens fp32 rounding of the angles moves logprobs by ~1e-4). One format per pass,
        so pipeline stages exchange one shape."""
        if self.packed_format == "thd":
            return True
        return self.per_document and self.cfg.context_parallel_size == 1 and any(
            is_packed(m.document_ids) for m in micro_batches)

    def _forward(self, model: torch.nn.Module, micro: Batch, thd: bool) -> torch.Tensor:
        """On the last stage: logits [B, T / cp, V_local] (this CP rank's positions; thd format:
        [1, B * T, V_local]), or with ``logprob_chunk_tokens`` the final hidden states
        [T / cp, B, H] ([B * T, 1, H]; under sequence parallelism / tp along the sequence);
        elsewhere the stage's hidden states.

        Packed rows, per document: thd segments (``_uses_thd``), or under context parallelism
        the rows' document ids [B, T] in the attention mask's slot (SDPAAttention's
        per-document path), on the host, where reading the document bounds costs no device
        synchronisation. Dense: a [B, 1, T, T] mask ([B, 1, T / cp, T] under CP)."""
        if self.cfg.context_parallel_size > 1:
            # queries of this rank's positions against the whole row (context_parallel.py)
            mine = local_positions(micro.width, self.cfg.context_parallel_size, self._cp_rank, micro.input_ids.device)
            mask = (micro.document_ids.cpu() if self.per_document
                    else blocked_attention(micro.document_ids, mine))
            return model(input_ids=micro.input_ids[:, mine], position_ids=micro.position_ids[:, mine],
                         attention_mask=mask)
        if thd:  # all rows as one [1, B * T] sequence of segments
            return model(input_ids=micro.input_ids.reshape(1, -1), position_ids=micro.position_ids.reshape(1, -1),
                         attention_mask=None, packed_seq_params=thd_params(micro.document_ids))
        mask = blocked_attention(micro.document_ids) if is_packed(micro.document_ids) else None
        return model(input_ids=micro.input_ids, position_ids=micro.position_ids, attention_mask=mask)

    def _output_weight(self) -> torch.Tensor:
        """The output layer's weight shard [V_local, H] (the embedding's where they are tied)."""
        if self.model.share_embeddings_and_output_weights:
            return self.model.shared_embedding_or_output_weight()
        return self.model.output_layer.weight

    def _batch_logprobs(self, logits: torch.Tensor, micro: Batch, thd: bool) -> torch.Tensor:
        """[B, T] logprobs in Batch alignment from the last stage's output (``_forward``; under
        CP: of this rank's positions, gathered over the CP ranks)."""
        vocab, temperature = self.hf_config.vocab_size, self.temperature
        cp = self.cfg.context_parallel_size
        chunk = self.logprob_chunk_tokens
        if chunk == 0 and thd:
            logits = logits.reshape(micro.num_rows, micro.width, -1)
        if chunk == 0 and cp == 1:
            return token_logprobs(logits, micro.input_ids, vocab, temperature)
        targets = torch.nn.functional.pad(micro.input_ids[:, 1:], (0, 1))  # the last position has none
        if cp > 1:
            targets = targets[:, local_positions(micro.width, cp, self._cp_rank, targets.device)]
        if chunk == 0:
            following = next_token_logprobs(logits, targets, vocab, temperature)
        else:
            # hidden [S, B, H] (thd: [B * T, 1, H]): targets in the same sequence-first layout
            layout = targets.reshape(-1, 1) if thd else targets.t()
            following = chunked_logprobs(
                logits, self._output_weight(), layout, vocab_size=vocab, temperature=temperature, chunk_tokens=chunk,
                sequence_parallel=self.model.output_layer.sequence_parallel,
            ).t().reshape(targets.shape)
        if cp > 1:
            following = gather_logprobs(following)
        return torch.nn.functional.pad(following[:, :-1], (1, 0))

    def _run(self, micro_batches: list[Batch], loss_fn: LossFn | None, forward_only: bool) -> list[dict]:
        """One pass of megatron's schedule; per micro-batch results on the last stage, [] elsewhere."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.cfg.pipeline_parallel_size > 1:
            # Stages exchange activations of a fixed shape unless told otherwise: micro-batches of
            # different shapes (a token budget) make megatron send each activation's shape ahead
            # of it, rather than padding all of them to the most rows x the widest row.
            self.tcfg.variable_seq_lengths = len({(m.num_rows, m.width) for m in micro_batches}) > 1
        # Sequence parallelism: each TP rank holds width / (cp TP) positions between the linears;
        # context parallelism: each CP rank holds 2 of 2 cp equal chunks.
        multiple = (2 * self.cfg.context_parallel_size if self.cfg.context_parallel_size > 1 else 1) * (
            self.cfg.tensor_parallel_size if self.cfg.sequence_parallel else 1)
        if multiple > 1:
            micro_batches = [m.padded_to(m.num_rows, -(-m.width // multiple) * multiple) for m in micro_batches]
        micro_batches = [m.to(self.device) for m in micro_batches]
        thd = self._uses_thd(micro_batches)

        def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
            micro = next(data_iterator)
            output = self._forward(model, micro, thd)

            def loss_func(logits: torch.Tensor):
                logprobs = self._batch_logprobs(logits, micro, thd)
                if loss_fn is None:
                    return logprobs.sum() * 0.0, {"logprobs": logprobs.detach()}
                loss, metrics = loss_fn(logprobs, micro)
                return loss, {k: v.detach().clone() for k, v in metrics.items()}  # megatron divides the loss in place

            return output, loss_func

        rows, width = micro_batches[0].num_rows, micro_batches[0].width
        if thd:  # pipeline stages exchange [B * T, 1, hidden]
            rows, width = 1, rows * width
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.ddp],
            num_microbatches=len(micro_batches), seq_length=width, micro_batch_size=rows, forward_only=forward_only,
        )

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """[B, T] logprobs of ``batch`` (no gradients), on every rank, in the batch's row order.

        Micro-batches as ``self.micro_batching`` says (by rows, or by a token budget over rows
        sorted by length).
        Positions past a row's end are 0.
        """
        micro, groups = split_batch(batch, self.micro_batching)
        self.ddp.eval()
        try:
            results = self._run(micro, None, forward_only=True)
        finally:
            self.ddp.train()
        merged = None
        if results:  # the last stage: each result may be padded (pipeline shape, CP / SP widths)
            merged = merge_rows([r["logprobs"].cpu() for r in results], micro, groups, batch.num_rows, batch.width)
        return _from_last_stage(merged)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on the SUM of ``loss_fn``'s shares over micro-batches and
        data-parallel ranks (the step contract, ``algorithms/losses.py``): megatron divides
        each micro-batch's loss by their number and its DDP averages gradients over the
        data-parallel ranks, so each loss is multiplied by both here. Then clip, optimizer
        and LR step. Metrics: summed over micro-batches and data-parallel ranks (``*_max``:
        maxima), on every rank."""
        if self.optimizer is None:
            raise RuntimeError("call setup_optimizer() before train_step()")
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        scale = len(micro_batches) * data_parallel_size()

        def share(logprobs: torch.Tensor, micro: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss, metrics = loss_fn(logprobs, micro)
            return loss * scale, {**metrics, _LOSS_SUM: loss.detach()}

        results = self._run(micro_batches, share, forward_only=False)
        # the last stage's data-parallel peers are last stages too: they reduce together
        totals = _from_last_stage(reduce_step_metrics(results) if results else None)
        # a data-parallel peer may see a non-finite loss alone: all ranks skip the step together
        if not every_rank(all(torch.isfinite(torch.tensor(v)) for v in totals.values())):
            self.optimizer.zero_grad()
            mine = not all(torch.isfinite(v).all() for r in results for v in r.values())
            raise non_finite_loss(ranks_where(mine), world_size(), totals)
        totals.pop(_LOSS_SUM)
        totals["lr"] = self._set_lr()
        updated, grad_norm, _ = self.optimizer.step()
        if not updated or grad_norm is None or not torch.isfinite(torch.tensor(grad_norm)):
            self.optimizer.zero_grad()
            raise NonFiniteLossError(f"gradient norm is {grad_norm}")
        self.step += 1
        totals["grad_norm"] = float(grad_norm)
        return totals

    # -- weights -----------------------------------------------------------------------------
    def hf_layout(self) -> list[TensorSpec]:
        """Name, dtype and shape of every tensor :meth:`export_weights` yields, in its order."""
        return [TensorSpec(*entry) for entry in hf_weight_layout(self.model, self.hf_config)]

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Hugging Face-named tensors, one decoder layer at a time, on every rank
        (TP shards all-gathered, pipeline stages broadcast). A collective: every rank iterates."""
        return gather_hf_weights(self.model, self.hf_config)

    # -- the KL term's reference policy ------------------------------------------------------
    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """Keep the current weights as the reference policy: a host copy (pinned on CUDA) of
        this rank's parameter shards, in the model's dtype. Host memory: one copy of the shards
        plus a same-sized staging copy for the training weights during
        :meth:`reference_logprobs`; no second model on the device."""
        pin = self.on_gpu
        self._reference = [p.detach().to("cpu", copy=True) for p in self.model.parameters()]
        if pin:
            self._reference = [t.pin_memory() for t in self._reference]
        self._stash = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in self._reference]

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """[B, T] logprobs of ``batch`` under the snapshot's weights (micro-batched as
        :meth:`logprobs`), on every rank; the training weights are restored bit for bit.

        The weights are copied into the parameters in place: megatron's DDP parameters are
        views into its contiguous buffers, and under bf16 the optimizer's fp32 main weights
        are separate tensors this never touches."""
        if self._reference is None:
            raise RuntimeError("call snapshot_reference() before reference_logprobs()")
        params = list(self.model.parameters())
        for param, stash, reference in zip(params, self._stash, self._reference):
            stash.copy_(param)
            param.copy_(reference)
        try:
            return self.logprobs(batch)
        finally:
            for param, stash in zip(params, self._stash):
                param.copy_(stash)

    # -- checkpoints -------------------------------------------------------------------------
    # CheckpointManager calls save() on every rank with the same directory (a collective).
    saves_collectively = True

    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.sharded_state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                self.model.sharded_state_dict(), is_loading=is_loading, metadata=checkpoint_metadata(self.optimizer)
            )
        return state

    def save(self, directory: Path, extra_state: dict | None = None, weights_only: bool = False,
             *, asynchronous: bool = False) -> QueuedWrite | None:
        """Resumable: ``megatron/``, a distributed checkpoint of the model and optimizer shards
        that every rank writes at once (``checkpointing.py``); with ``asynchronous`` the write
        goes on in the background and the returned :class:`QueuedWrite` says when it is on disk.
        ``weights_only``: a Hugging Face folder (``final/``, kept candidates: the next stage,
        evaluation and vLLM load them), streamed one full tensor at a time to rank 0; the
        distributed optimizer could not even write its state before its first step. Both: the
        loop state and ``config.json`` (rank 0). A collective: every rank calls it."""
        directory = Path(directory)
        if is_rank0():
            self.hf_config.save_pretrained(str(directory))
            torch.save({"extra": extra_state or {}, "step": self.step}, directory / TRAINER_STATE)
        if weights_only:
            write_hf_weights(self.export_weights(), self.hf_layout(), self.hf_config, directory, writer_rank=is_rank0())
            barrier()
            return None
        tie_results_queue_to_trainer()  # synchronous saves write through megatron-core's queue too
        if asynchronous and self._async_writes is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_writes = AsyncCallsQueue()
        return write_distributed(self._sharded_state(is_loading=False), directory,
                                 self._async_writes if asynchronous else None)

    @torch.no_grad()
    def load(self, directory: Path) -> dict:
        """Weights and optimizer state from ``save`` (another layout too); returns the loop state."""
        directory = Path(directory)
        if self.optimizer is not None and self.cfg.distributed_optimizer:
            prepare_for_load(self.optimizer)
        loaded = read_distributed(self._sharded_state(is_loading=True), directory)
        self.model.load_state_dict(loaded["model"])
        if self.optimizer is not None and "optimizer" in loaded:
            self.optimizer.load_state_dict(loaded["optimizer"])
            finish_load(self.optimizer)
        state = load_trainer_state(directory / TRAINER_STATE)
        self.step = int(state.get("step", 0))
        return state.get("extra", {})


def _from_last_stage(value: Any) -> Any:
    """``value`` as held by the last pipeline stage, on every stage of this pipeline."""
    from megatron.core import parallel_state

    return broadcast_object(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                            group=parallel_state.get_pipeline_model_parallel_group())
