"""One GRPO step's gradient under different splits of its rows (shared by the in-process tests
and their torchrun worker): the step's rows as one micro-batch, as four micro-batches of
unequal widths (a token budget), on two data-parallel ranks, or across two pipeline stages.

``python _step_split.py --backend torch|megatron [--pp 2] --folder DIR --out grads.pt`` under
``torch.distributed.run --nproc-per-node 2``: each data-parallel rank trains its share of the
rows (every other row, as ``utils.distributed.shard`` deals prompts), split by the token budget,
for each loss aggregation; rank 0 saves ``{loss_agg: {"grads": {hf_name: grad}, "loss": float,
"micro": [micro-batches per rank]}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "megatron"))
warnings.filterwarnings("ignore")

from _megatron_tiny import tiny_hf_model  # noqa: E402

from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss  # noqa: E402
from fastmath_nemo.config.schema import LossAggregation as LOSS_AGGREGATIONS  # noqa: E402
from fastmath_nemo.batching.micro_batches import MicroBatching, micro_batches  # noqa: E402
from fastmath_nemo.batching.step_totals import step_totals  # noqa: E402
from fastmath_nemo.batching.batch import Batch, batch_from_sequences  # noqa: E402
from fastmath_nemo.config.schema import OptimizerConfig  # noqa: E402

# No clipping (it would rescale the gradient we compare) and lr 0: the weights stay put, so
# every split of every loss aggregation is measured at the same point.
OPTIMIZER = OptimizerConfig(lr=0.0, weight_decay=0.0, max_grad_norm=1e9, warmup_ratio=0.0)
# Rows of 4..26 tokens; with this budget the step's 8 rows are 4 micro-batches of different
# widths (26, 23, 15, 7), and the two data-parallel ranks' 4 rows each are 3 and 2.
LENGTHS = (26, 7, 19, 4, 12, 23, 9, 15)
BUDGET = 48
PROMPT = 3


def step_rows() -> Batch:
    """Eight GRPO rows of unequal lengths; row 3 is a prompt alone (no targets: it counts in
    Dr.GRPO's B but not in seq-mean-token-mean's sequence count). Old and reference logprobs
    are random, so ratios are off 1 (some clipped) and the KL term is live."""
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in LENGTHS]
    masks = [[0] * PROMPT + [1] * (n - PROMPT) if n > PROMPT + 1 else [0] * n for n in LENGTHS]
    batch = batch_from_sequences(seqs, masks, pad_id=0)
    shape = batch.loss_mask.shape
    return batch.with_fields(
        advantages=torch.randn(len(LENGTHS), generator=gen),
        old_logprobs=-2.0 - 0.3 * torch.rand(shape, generator=gen),
        ref_logprobs=-2.0 - 0.3 * torch.rand(shape, generator=gen),
    )


def loss_cfg(loss_agg: str) -> GRPOLossConfig:
    # norm_length None: Dr.GRPO's constant is the step's longest row, a step total too.
    return GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.04, loss_agg=loss_agg)  # type: ignore[arg-type]


def rank_rows(batch: Batch, rank: int, ranks: int) -> Batch:
    """Rank ``rank``'s rows: every ``ranks``-th from ``rank`` (as prompts are sharded)."""
    return batch.select(torch.arange(rank, batch.num_rows, ranks))


@contextlib.contextmanager
def captured_gradients(policy: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Inside, ``train_step`` records the step's gradient (HF names, fp32, CPU) just before the
    optimizer applies it; with megatron a collective over all ranks (it gathers TP / PP)."""
    store: dict[str, torch.Tensor] = {}
    optimizer = policy.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):  # torch: a hook (the LR scheduler wraps step)
        handle = optimizer.register_step_pre_hook(lambda *_: store.update(_gradients(policy)))
        try:
            yield store
        finally:
            handle.remove()
        return
    real_step = optimizer.step  # megatron's optimizer is no torch Optimizer: wrap its step

    def step(*args: Any, **kwargs: Any) -> Any:
        store.update(_gradients(policy))
        return real_step(*args, **kwargs)

    optimizer.step = step
    try:
        yield store
    finally:
        optimizer.step = real_step


def _gradients(policy: Any) -> dict[str, torch.Tensor]:
    if hasattr(policy, "ddp"):  # megatron: the reduced gradient lives in each param's main_grad
        from fastmath_nemo.policy.megatron.convert import gather_hf_weights

        params = list(policy.model.parameters())
        saved = [p.data for p in params]
        with torch.no_grad():
            try:
                for p in params:
                    p.data = p.main_grad.view_as(p).to(p.dtype)
                return {k: v.detach().float().cpu().clone() for k, v in gather_hf_weights(policy.model, policy.hf_config)}
            finally:
                for p, data in zip(params, saved):
                    p.data = data
    return {k: p.grad.detach().float().cpu().clone() for k, p in policy.model.named_parameters() if p.grad is not None}


def step_gradients(policy: Any, micro: list[Batch], loss_agg: str) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient and reported loss of one GRPO step on ``micro`` (this rank's micro-batches)."""
    loss_fn = functools.partial(grpo_loss, cfg=loss_cfg(loss_agg), totals=step_totals(micro))
    with captured_gradients(policy) as grads:
        metrics = policy.train_step(micro, loss_fn)
    return dict(grads), metrics["loss"]


def budget_split(batch: Batch) -> list[Batch]:
    return micro_batches(batch, MicroBatching(max_tokens=BUDGET))


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("torch", "megatron"), required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The policy (and torch DDP's Reducer in it) is gone when this returns, before the process
    # group is destroyed: a Reducer freed after destroy_process_group holds the last reference
    # to the gloo group and destroys it with the GIL held, while gloo's worker thread waits for
    # the GIL to free the last all_gather's tensors: a deadlock in 1 run of 3 to 8.
    results = _this_ranks_results(args)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    if args.backend == "megatron":
        from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel

        destroy_model_parallel()
    else:
        dist.destroy_process_group()


def _this_ranks_results(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    import torch.distributed as dist

    if args.backend == "megatron":
        from fastmath_nemo.config.schema import MegatronConfig
        from fastmath_nemo.policy.megatron.policy import MegatronPolicy

        policy: Any = MegatronPolicy(args.folder, MegatronConfig(pipeline_parallel_size=args.pp, attention_backend="sdpa"))
    else:
        from fastmath_nemo.policy.torch_policy import TorchPolicy
        from fastmath_nemo.utils.distributed import init_distributed_if_needed

        init_distributed_if_needed("cpu")
        policy = TorchPolicy(tiny_hf_model("qwen2"), torch.device("cpu"))
    from fastmath_nemo.utils.distributed import data_parallel_rank, data_parallel_size

    ranks, rank = data_parallel_size(), data_parallel_rank()
    batch = step_rows()
    mine = rank_rows(batch, rank, ranks) if ranks > 1 else batch
    micro = budget_split(mine)
    results = {}
    for loss_agg in LOSS_AGGREGATIONS:
        policy.setup_optimizer(OPTIMIZER, total_steps=10)
        grads, loss = step_gradients(policy, micro, loss_agg)
        counts: list = [None] * dist.get_world_size()
        dist.all_gather_object(counts, len(micro))
        results[loss_agg] = {"grads": grads, "loss": loss, "micro": counts}
    return results


if __name__ == "__main__":
    main()
