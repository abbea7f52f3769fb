"""Run the main job (the embedded recipe) for one or more seeds and check it against the targets.

    python benchmarks/recipe_targets.py [--seeds N] [key=value ...]

Each seed is a full run of ``launch/run.py`` with ``run.seed`` = S, S + 1, ... (S: ``run.seed``
among the overrides, else the schema's 1234): the tiny model's initial weights, the order of
SFT and GRPO batches and the sampling change; the task's problems (``data.synthetic.seed``) do
not. Prints each seed's table (base / SFT / GRPO at the smallest budget), then the mean and
spread (sample standard deviation, min and max) over the seeds, and the machine.

Targets (issue 13, on a 2-core CPU machine with the defaults of conf/recipe.yaml): every seed
has SFT pass@1 >= 0.95 and GRPO mean output tokens >= 35% below SFT's at a pass@1 at most 2
points lower, within 12 minutes; over the seeds GRPO loses at most 1 point on average. The
baseline of every ratio (the SFT model) is measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEED = 1234  # RunConfig.seed


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


def run_seed(overrides: list[str], seed: int) -> dict:
    """One main job; its figures at the smallest budget, the wall time and the kept GRPO step."""
    # one run directory per set of overrides and seed, e.g. runs/benchmark-recipe-generation.backend=vllm-seed1234;
    # many overrides are named by their hash instead (a file name has at most 255 bytes)
    name = "-".join(["benchmark-recipe", *(o.replace("/", "_") for o in overrides)])
    if len(name) > 150:
        name = "benchmark-recipe-" + hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:12]
    run_dir = ROOT / "runs" / f"{name}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "run.name=benchmark-recipe", *overrides,
           f"run.seed={seed}", f"run.dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    report = json.loads((run_dir / "report.json").read_text())
    rows = report["evaluations"]
    budget = min(r["token_budget"] for r in rows)
    by_model = {r["model"]: r for r in rows if r["token_budget"] == budget}
    sft, grpo = by_model["sft"], by_model["grpo"]
    return {
        "seed": seed, "budget": budget, "wall_min": wall / 60, "rows": by_model, "run_dir": run_dir,
        "kept": report["meta"].get("grpo_kept"),
        "sft_pass": 100 * sft["pass@1"], "grpo_pass": 100 * grpo["pass@1"],
        "token_cut": 100 * (1.0 - grpo["mean_output_tokens"] / sft["mean_output_tokens"]),
        "drop_pts": 100 * (sft["pass@1"] - grpo["pass@1"]),
    }


def seed_checks(r: dict) -> list[tuple[str, bool]]:
    sft = r["rows"]["sft"]
    return [
        ("SFT pass@1 >= 0.95", r["sft_pass"] >= 95.0),
        ("GRPO tokens >= 35% below SFT", r["token_cut"] >= 35.0),
        ("GRPO pass@1 within 2 points of SFT", r["drop_pts"] <= 2.0),
        (">= 200 problems x >= 4 samples", sft["n_problems"] >= 200 and sft["n_samples"] >= 4),
        ("wall time <= 12 min", r["wall_min"] <= 12.0),
    ]


def print_seed(r: dict) -> None:
    print(f"\nseed {r['seed']}: budget {r['budget']} tokens, {r['rows']['sft']['n_problems']} problems x "
          f"{r['rows']['sft']['n_samples']} samples, {r['run_dir']}")
    for name in ("base", "sft", "grpo"):
        row = r["rows"][name]
        print(f"  {name:5s} pass@1 {100 * row['pass@1']:5.1f}  mean output tokens {row['mean_output_tokens']:7.1f}"
              f"  truncated {100 * row['truncated_share']:4.1f}%")
    print(f"  GRPO vs SFT: tokens {-r['token_cut']:+.1f}%, pass@1 {-r['drop_pts']:+.1f} pts")
    if r["kept"]:
        print(f"  GRPO output: step {r['kept']['step']} of {r['kept']['of_steps']} ({r['kept']['keep']})")
    print(f"  wall time: {r['wall_min']:.1f} min")
    for name, ok in seed_checks(r):
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")


def spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {statistics.fmean(values):7.2f}  std {std:6.2f}  min {min(values):7.2f}  max {max(values):7.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="runs with run.seed = S, S+1, ... (default 1)")
    args, overrides = parser.parse_known_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    first = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("run.seed=")), DEFAULT_SEED)
    overrides = [o for o in overrides if not o.startswith("run.seed=")]
    results = []
    for seed in range(first, first + args.seeds):
        results.append(run_seed(overrides, seed))
        print_seed(results[-1])  # as soon as it is known: a multi-seed benchmark runs for an hour

    print(f"\ndate: {datetime.date.today().isoformat()}  machine: {machine()}")
    print(f"{len(results)} seed(s): {', '.join(str(r['seed']) for r in results)}"
          + (f"; overrides: {' '.join(overrides)}" if overrides else ""))
    for key, label in (("sft_pass", "SFT pass@1 (%)"), ("grpo_pass", "GRPO pass@1 (%)"),
                       ("token_cut", "GRPO token cut vs SFT (%)"), ("drop_pts", "GRPO pass@1 loss (pts)"),
                       ("wall_min", "wall time (min)")):
        print(f"  {label:27s} {spread([r[key] for r in results])}")
    every = all(ok for r in results for _, ok in seed_checks(r))
    mean_ok = statistics.fmean(r["drop_pts"] for r in results) <= 1.0
    print(f"  [{'PASS' if every else 'FAIL'}] every seed meets its targets")
    print(f"  [{'PASS' if mean_ok else 'FAIL'}] mean GRPO pass@1 loss <= 1 point")
    return 0 if every and mean_ok else 1


if __name__ == "__main__":
    sys.exit(main())
