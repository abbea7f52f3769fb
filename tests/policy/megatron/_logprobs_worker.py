"""Worker for test_megatron_logprobs_parallel.py, run by ``torch.distributed.run --nproc-per-node 2``.

``_logprobs_worker.py --model M --folder DIR --out result.json [--sequence-parallel]``: every
rank builds a MegatronPolicy at TP=2 from the HF folder and measures

- chunked (5 tokens) against whole-row logprobs of padded and packed rows, and the gradients
  of every parameter shard (megatron DDP's main_grad) of an SFT loss, both ways;
- the reference policy: after ``snapshot_reference`` and one SFT step, ``reference_logprobs``
  against the initial logprobs, and whether the training weights came back bit for bit.

Rank 0 writes ``{"cases": [{"rank", "logprob_diff", "grad_diff", "output_grad_max",
"reference_diff", "moved", "restored"}, ...]}`` gathered from both ranks.
"""

from __future__ import annotations

import argparse
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
from _megatron_tiny import OPTIMIZER, packed_rows, sft_rows  # noqa: E402

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel  # noqa: E402
from fastmath_nemo.policy.megatron.policy import MegatronPolicy  # noqa: E402


def gradients(policy: MegatronPolicy, micro_batches, loss_fn) -> dict[str, torch.Tensor]:
    """This rank's parameter gradients (main_grad) of one forward-backward pass, no step."""
    policy.ddp.train()
    policy.ddp.zero_grad_buffer()
    policy._run(micro_batches, loss_fn, forward_only=False)
    return {name: p.main_grad.detach().clone() for name, p in policy.model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = MegatronConfig(tensor_parallel_size=2, attention_backend="sdpa", sequence_parallel=args.sequence_parallel)
    policy = MegatronPolicy(args.folder, cfg, temperature=0.7, logprob_chunk_tokens=0)
    batch, micro = sft_rows()
    rows = [batch, packed_rows()]
    whole = [policy.logprobs(b) for b in rows]
    whole_grads = gradients(policy, micro, sft_loss)
    policy.logprob_chunk_tokens = 5
    chunked = [policy.logprobs(b) for b in rows]
    chunked_grads = gradients(policy, micro, sft_loss)
    output = "embedding.word_embeddings.weight" if policy.model.share_embeddings_and_output_weights \
        else "output_layer.weight"
    result = {
        "rank": dist.get_rank(),
        "logprob_diff": max(float((a - b).abs().max()) for a, b in zip(chunked, whole)),
        "grad_diff": max(float((chunked_grads[k] - whole_grads[k]).abs().max()) for k in whole_grads),
        "output_grad_max": float(whole_grads[output].abs().max()),
    }

    policy.snapshot_reference()
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    policy.train_step(micro, sft_loss)
    trained = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    reference = policy.reference_logprobs(batch)
    result["reference_diff"] = float((reference - chunked[0]).abs().max())
    result["moved"] = float((policy.logprobs(batch) - chunked[0]).abs().max())
    result["restored"] = all(torch.equal(trained[k], p) for k, p in policy.model.named_parameters())

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"cases": gathered}))
    destroy_model_parallel()  # gloo threads alive at interpreter shutdown can abort the process


if __name__ == "__main__":
    main()
