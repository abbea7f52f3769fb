"""Run the main job (the embedded recipe) and print its figures against the targets.

    python benchmarks/recipe_targets.py [key=value ...]

Targets (issue 2, on a 2-core CPU machine): SFT pass@1 >= 0.90 on >= 200 held-out problems
x 4 samples; GRPO mean output tokens >= 30% below SFT's at a pass@1 at most 2 points lower;
the whole job within 15 minutes. The baseline of every ratio (the SFT model) is measured in
the same run. Prints the machine it ran on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> int:
    overrides = [a for a in sys.argv[1:]]
    # one run directory per set of overrides, e.g. runs/benchmark-recipe-generation.backend=vllm
    run_dir = ROOT / "runs" / "-".join(["benchmark-recipe", *(o.replace("/", "_") for o in overrides)])
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "run.name=benchmark-recipe", *overrides, f"run.dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start

    rows = json.loads((run_dir / "report.json").read_text())["evaluations"]
    by_model = {(r["model"], r["token_budget"]): r for r in rows}
    budget = min(r["token_budget"] for r in rows)
    base, sft, grpo = (by_model[(m, budget)] for m in ("base", "sft", "grpo"))
    token_cut = 1.0 - grpo["mean_output_tokens"] / sft["mean_output_tokens"]
    pass_drop_pts = 100.0 * (sft["pass@1"] - grpo["pass@1"])
    checks = [
        ("SFT pass@1 >= 0.90", sft["pass@1"] >= 0.90),
        ("GRPO tokens >= 30% below SFT", token_cut >= 0.30),
        ("GRPO pass@1 within 2 points of SFT", pass_drop_pts <= 2.0),
        (">= 200 problems x >= 4 samples", sft["n_problems"] >= 200 and sft["n_samples"] >= 4),
        ("wall time <= 15 min", wall <= 900),
    ]
    print()
    print(f"date: {datetime.date.today().isoformat()}  machine: {machine()}")
    print(f"budget {budget} tokens, {sft['n_problems']} problems x {sft['n_samples']} samples")
    for name, r in (("base", base), ("sft", sft), ("grpo", grpo)):
        print(f"  {name:5s} pass@1 {100 * r['pass@1']:5.1f}  mean output tokens {r['mean_output_tokens']:7.1f}"
              f"  truncated {100 * r['truncated_share']:4.1f}%")
    print(f"GRPO vs SFT: tokens {-100 * token_cut:+.1f}%, pass@1 {-pass_drop_pts:+.1f} pts")
    print(f"wall time: {wall / 60:.1f} min")
    for name, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
