"""Worker for test_megatron_policy_parallel.py, run by ``torch.distributed.run --nproc-per-node 2``.

``_policy_worker.py --tp T --pp P [--cp C] --model M --folder DIR --out result.json``: every rank
builds a MegatronPolicy of layout (T, P, C, DP = 2 / (T * P * C)) from the HF folder, compares
its logprobs (padded rows, and packed rows of two documents) with a single-process
TorchPolicy's, takes one SFT step on four rows (two micro-batches; under DP each rank takes
one of them), and compares the loss and the gathered weights with the TorchPolicy's step on
the same rows; with ``--save DIR`` it then saves the policy there (every rank takes part).
Then both take one GRPO step on the same rows, and the gathered weights are compared again.
Logprobs come from the hidden states in chunks of 5 tokens (``--logprob-chunk-tokens``, 0:
whole-row logits) and packed rows attend per document (``--packed-attention dense``: the
mask path).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _megatron_tiny import (  # noqa: E402
    OPTIMIZER,
    logprob_diff,
    max_abs_diff,
    packed_rows,
    sft_rows,
    tiny_hf_model,
    weight_diff,
)

from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss, sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel  # noqa: E402
from fastmath_nemo.policy.megatron.policy import MegatronPolicy  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--tp", "--pp"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--model", required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="after the step, save a resumable (distributed) checkpoint here")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--sequence-parallel", action="store_true")
    # small chunks: the logprobs (and gradients) come from several chunks of hidden states
    parser.add_argument("--logprob-chunk-tokens", type=int, default=5)
    parser.add_argument("--packed-attention", default="per_document")
    args = parser.parse_args()

    cfg = MegatronConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                         context_parallel_size=args.cp, attention_backend="sdpa",
                         distributed_optimizer=args.distributed_optimizer, recompute_activations=args.recompute,
                         sequence_parallel=args.sequence_parallel)
    policy = MegatronPolicy(args.folder, cfg, temperature=0.7, logprob_chunk_tokens=args.logprob_chunk_tokens,
                            packed_attention=args.packed_attention)
    batch, micro = sft_rows()
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // (args.tp * args.pp * args.cp)
    mine = micro if dp == 1 else [micro[rank]]

    reference = TorchPolicy(tiny_hf_model(args.model), torch.device("cpu"), temperature=0.7)
    padded_diff, packed_diff = logprob_diff(policy, reference, batch), logprob_diff(policy, reference, packed_rows())
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    reference.setup_optimizer(OPTIMIZER, total_steps=10)
    # The reference is one process's run of all the rows on every rank, not a data-parallel
    # policy: under DDP over the world, its rank copies of the same rows would add up (train_step
    # sums data-parallel shares), doubling its gradient.
    reference._train_module = reference._logprob_module
    ours, theirs = policy.train_step(mine, sft_loss), reference.train_step(micro, sft_loss)
    weights = dict(policy.export_weights())
    expected = dict(reference.model.named_parameters())
    result = {
        "rank": rank, "dp": dp, "logprob_diff": padded_diff, "packed_logprob_diff": packed_diff,
        "loss_diff": abs(ours["loss"] - theirs["loss"]) if dp == 1 else None,
        "grad_norm_diff": abs(ours["grad_norm"] - theirs["grad_norm"]),
        "weight_diff": max_abs_diff(weights, expected),
        "names_match": sorted(weights) == sorted(expected),
        # the layout a streamed Hugging Face folder is written with: what export_weights yields
        "layout_matches": [(s.name, s.dtype, s.shape) for s in policy.hf_layout()]
        == [(name, t.dtype, tuple(t.shape)) for name, t in weights.items()],
    }
    if args.save:
        if rank == 0:
            Path(args.save).mkdir(parents=True)
        dist.barrier()
        policy.save(Path(args.save), extra_state={"step": 1})

    # ... then one GRPO step on the same rows (random advantages, old logprobs of the reference)
    advantages = torch.randn(batch.num_rows, generator=torch.Generator().manual_seed(1))
    grpo = batch.with_fields(advantages=advantages, old_logprobs=reference.logprobs(batch))
    grpo_micro = [grpo.select(slice(0, 2)), grpo.select(slice(2, 4))]
    loss_fn = functools.partial(grpo_loss, cfg=GRPOLossConfig(beta=0.0, eps_low=0.2, eps_high=0.28))
    ours = policy.train_step(grpo_micro if dp == 1 else [grpo_micro[rank]], loss_fn)
    theirs = reference.train_step(grpo_micro, loss_fn)
    result["grpo_grad_norm_diff"] = abs(ours["grad_norm"] - theirs["grad_norm"])
    result["grpo_weight_diff"] = weight_diff(policy, reference)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"cases": gathered}))
    # Tear the groups down before exit: gloo's threads still running at interpreter
    # shutdown can abort the process ("terminate called without an active exception").
    destroy_model_parallel()


if __name__ == "__main__":
    main()
