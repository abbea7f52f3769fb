"""Worker for test_megatron_checkpoints.py, run by ``torch.distributed.run --nproc-per-node 4``.

``_checkpoint_worker.py train --folder HF --ckpt DIR --out W.pt [--async]``: TP=2 x DP=2 with
the distributed optimizer and sequence parallelism; four SFT steps (each data-parallel rank its
micro-batch of two rows), a resumable checkpoint written after step 2 (``--async``: in the
background while steps 3 and 4 train), and rank 0 saving the gathered weights after steps 2
and 4 into ``W.pt``. ``resume --folder HF --ckpt DIR --out W.pt``: the same layout loads the
checkpoint and trains steps 3 and 4.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _megatron_tiny import OPTIMIZER, sft_rows  # noqa: E402

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel  # noqa: E402
from fastmath_nemo.policy.megatron.policy import MegatronPolicy  # noqa: E402

LAYOUT = MegatronConfig(tensor_parallel_size=2, attention_backend="sdpa", distributed_optimizer=True,
                        sequence_parallel=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["train", "resume"])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    args = parser.parse_args()

    policy = MegatronPolicy(args.folder, LAYOUT, temperature=0.7)
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    _, micro = sft_rows()
    mine = [micro[dist.get_rank() // 2]]  # data-parallel rank = global rank // TP
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def step() -> None:
        policy.train_step(mine, sft_loss)
        weights = {name: tensor.clone() for name, tensor in policy.export_weights()}  # a collective
        snapshots[policy.step] = weights

    pending = None
    if args.phase == "train":
        step(), step()
        ckpt = Path(args.ckpt)
        if dist.get_rank() == 0:
            ckpt.mkdir(parents=True)
        dist.barrier()
        pending = policy.save(ckpt, extra_state={"step": 2}, asynchronous=args.asynchronous)
        assert (pending is not None) == args.asynchronous
        step(), step()  # the save may still be writing: it must hold step 2's state all the same
        if pending is not None:
            while not pending.finished(wait=False):  # as CheckpointManager.poll does each step
                time.sleep(0.05)
    else:
        assert policy.load(Path(args.ckpt))["step"] == 2 and policy.step == 2
        step(), step()
    if dist.get_rank() == 0:
        torch.save(snapshots, args.out)
    destroy_model_parallel()


if __name__ == "__main__":
    main()
