"""torchrun worker for tests/test_rank_faults.py: ``launch/run.py``'s main, with SFT's loss made
NaN on one rank at one step (one micro-batch per rank per step, so the n-th call is step n).
Each rank writes the error it raised to ``<out>/rank<R>.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    nan_rank, nan_step, out, argv = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    sys.path.insert(0, str(ROOT / "launch"))
    import run

    import fastmath_nemo.algorithms.sft as sft

    real_loss, calls = sft.sft_loss, [0]

    def loss(logprobs, batch, totals=None):
        calls[0] += 1
        value, metrics = real_loss(logprobs, batch, totals=totals)
        if int(os.environ["RANK"]) == nan_rank and calls[0] == nan_step:
            value = value * float("nan")
        return value, metrics

    sft.sft_loss = loss
    try:
        code = run.main(argv)
    except Exception as err:
        (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
