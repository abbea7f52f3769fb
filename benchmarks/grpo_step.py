"""GRPO step time of the recipe's loop, this checkout against a baseline commit, interleaved.

    python benchmarks/grpo_step.py                          # baseline 71873ba (before issue 12)
    python benchmarks/grpo_step.py --generators torch --reps 3 --baseline <commit>

Each run is the recipe's GRPO stage (``pipeline.grpo_stage``, conf=recipe) on the embedded tiny
model, fp32 on CPU, at 8 prompts x 8 generations x 128 tokens (the untrained model never stops,
so every completion has 128 tokens and both sides do the same work). A run is a subprocess that
imports either this checkout or the baseline (``git archive`` into a temporary folder). The
baseline and the new code run side by side, one pair at a time, ``--reps`` pairs per generator:
on a machine shared with other jobs the load changes from minute to minute, and only runs at
the same time see the same load (each also slows the other, alike). Each pair gives a ratio
of median step times; the first step of each run is a warm-up and is not counted.

The split is measured the same way for both codes, by timing the methods the loop calls
(``generate``, ``Policy.logprobs``, ``train_step``, ``update_weights``): the baseline loop logs
no scoring or logprob timings of its own. scoring = the step's wall time minus the rest
(decode, verify, rewards, advantages, metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("generation", "scoring", "logprobs", "train", "refit")
SHAPE = ["grpo.prompts_per_step=8", "grpo.num_generations=8", "generation.max_tokens=128"]


def worker(root: str, generator: str, steps: int, threads: int, out: str) -> None:
    """One run of ``steps`` GRPO steps with the package under ``root``; writes the per-step split."""
    sys.path.insert(0, root)
    import torch

    from fastmath_nemo import pipeline
    from fastmath_nemo.config import schema

    try:
        from fastmath_nemo.preflight import load_config
    except ImportError:  # a baseline from before the preflight module (3c0a983 and older)
        from fastmath_nemo.config.loader import load_config  # type: ignore[attr-defined,no-redef]
    from fastmath_nemo.generation.torch_generator import TorchGenerator
    from fastmath_nemo.policy.torch_policy import TorchPolicy

    assert Path(pipeline.__file__).is_relative_to(root), pipeline.__file__
    torch.set_num_threads(threads)
    events: list[tuple[str, float, float]] = []  # (method, start, end)

    def timed(cls: type, name: str) -> None:
        # Wrapping the classes' methods gives the same split for codes whose loops log
        # different timings (the baseline times no scoring or logprobs of its own).
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            result = original(self, *args, **kwargs)
            events.append((name, t0, time.perf_counter()))
            return result

        setattr(cls, name, wrapper)

    generators = [TorchGenerator]
    if generator == "vllm":
        from fastmath_nemo.generation.vllm_generator import VLLMGenerator

        generators = [VLLMGenerator]
    for cls in generators:
        timed(cls, "generate")
        timed(cls, "update_weights")
    timed(TorchPolicy, "logprobs")
    timed(TorchPolicy, "train_step")

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"run.dir={run_dir}", "policy.device=cpu", "policy.dtype=float32",
                     f"generation.backend={generator}", f"grpo.steps={steps}", "data.synthetic.n_train=400",
                     "data.synthetic.n_eval=20", *SHAPE]
        if hasattr(schema.GRPOConfig, "eval_every_steps"):  # held-out evaluations: not part of a step
            overrides += ["grpo.eval_every_steps=0", "grpo.keep=last"]
        cfg = load_config("recipe", overrides)
        run = pipeline.start_run(cfg)
        data = pipeline.load_task_data(cfg)
        pipeline.grpo_stage(run, data, pipeline.base_model_dir(run, data))
    Path(out).write_text(json.dumps(split_steps(events)))


def split_steps(events: list[tuple[str, float, float]]) -> list[dict[str, float]]:
    """Per step (from one ``generate`` start to the end of its ``update_weights``): seconds in
    each part. An ``update_weights`` before the first ``generate`` (a resume) is skipped."""
    steps: list[dict[str, float]] = []
    start = None
    for name, t0, t1 in events:
        if name == "generate":
            start = t0
            steps.append(dict.fromkeys(PARTS, 0.0))
        if start is None:
            continue
        part = {"generate": "generation", "logprobs": "logprobs", "train_step": "train",
                "update_weights": "refit"}[name]
        steps[-1][part] += t1 - t0
        if name == "update_weights":
            steps[-1]["step"] = t1 - start
            steps[-1]["scoring"] = steps[-1]["step"] - sum(steps[-1][p] for p in PARTS if p != "scoring")
            start = None
    return steps


def run_pair(roots: dict[str, Path], generator: str, steps: int, threads: int, work: Path) -> dict[str, list]:
    """One run of each code, started together; their counted steps' splits."""
    procs, outs = {}, {}
    for code, root in roots.items():
        outs[code] = work / f"{code}.json"
        cmd = [sys.executable, __file__, "--worker", str(root), "--generators", generator, "--steps", str(steps),
               "--threads", str(threads), "--out", str(outs[code])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root)}
        procs[code] = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
    results = {}
    for code, proc in procs.items():
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{code} run ({roots[code]}) failed:\n{err[-3000:]}")
        results[code] = json.loads(outs[code].read_text())[1:]  # the first step warms up
    return results


def baseline_tree(commit: str, work: Path) -> Path:
    """The package as of ``commit`` (tracked files only), unpacked under ``work``."""
    target = work / f"baseline-{commit}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def report(generator: str, results: dict[str, list[dict[str, float]]], ratios: list[float]) -> None:
    print(f"\n## generator={generator}: median seconds per step over {len(results['new'])} steps each")
    print("| code | step | " + " | ".join(PARTS) + " |\n|---|---:|" + "---:|" * len(PARTS))
    for code in ("baseline", "new"):
        rows = results[code]
        cells = [statistics.median(r[p] for r in rows) for p in ("step", *PARTS)]
        print(f"| {code} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print(f"step speed-up (baseline / new) per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="71873ba", help="commit to compare with (before issue 12)")
    parser.add_argument("--generators", nargs="+", default=["torch", "vllm"], choices=["torch", "vllm"])
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first not counted")
    parser.add_argument("--reps", type=int, default=3, help="pairs of runs (baseline and new together) per generator")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.generators[0], args.steps, args.threads, args.out)
        return

    import torch

    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start; Python {platform.python_version()}, "
          f"torch {torch.__version__}; {args.threads} torch thread(s) per run; baseline {args.baseline}, new: this "
          f"checkout at {_git('rev-parse', '--short', 'HEAD')}{' with uncommitted changes' if _git('status', '--porcelain', '-uno') else ''}")
    with tempfile.TemporaryDirectory() as work:
        roots = {"baseline": baseline_tree(args.baseline, Path(work)), "new": ROOT}
        for generator in args.generators:
            results: dict[str, list[dict[str, float]]] = {"baseline": [], "new": []}
            ratios = []
            for _ in range(args.reps):
                pair = run_pair(roots, generator, args.steps, args.threads, Path(work))
                ratios.append(statistics.median(r["step"] for r in pair["baseline"])
                              / statistics.median(r["step"] for r in pair["new"]))
                for code in results:
                    results[code] += pair[code]
            report(generator, results, ratios)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
