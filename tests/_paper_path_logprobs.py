"""torchrun worker for tests/test_paper_path.py: the trainer's logprobs of a few sequences at a
GRPO step checkpoint, computed as the trainer computes them (the policy ``pipeline.load_policy``
builds for ``conf/paper_14b`` with the test's overrides, loading the checkpoint as a resume does).

``python -m torch.distributed.run ... _paper_path_logprobs.py MODEL_DIR CHECKPOINT SEQUENCES OUT
key=value ...``: SEQUENCES is a JSON list of token-id lists; rank 0 writes the [B, T] logprobs
(``logprobs[b, t] = log p(ids[b, t] | ids[b, :t])``, 0 past a row's end) to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fastmath_nemo.batching.batch import batch_from_sequences
from fastmath_nemo.pipeline import Run, load_policy
from fastmath_nemo.preflight import load_config
from fastmath_nemo.utils.distributed import destroy_distributed, init_distributed_if_needed, is_rank0


def main() -> None:
    model_dir, checkpoint, sequences, out = (Path(a) for a in sys.argv[1:5])
    cfg = load_config("paper_14b", sys.argv[5:])
    device = torch.device("cpu")
    init_distributed_if_needed(device)
    policy = load_policy(Run(cfg, out.parent, device, metrics=None), model_dir,  # type: ignore[arg-type]
                         temperature=cfg.generation.temperature)
    policy.load(checkpoint)
    rows = json.loads(sequences.read_text())
    logprobs = policy.logprobs(batch_from_sequences(rows, [[1] * len(r) for r in rows], pad_id=0))
    if is_rank0():
        out.write_text(json.dumps(logprobs.tolist()))
    destroy_distributed()


if __name__ == "__main__":
    main()
