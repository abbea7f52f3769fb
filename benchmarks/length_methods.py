"""The length-control methods side by side: GRPO from one SFT checkpoint with each method.

    python benchmarks/length_methods.py [--run-dir DIR] [--sft DIR] [--methods paper,dapo,...]
                                        [--no-dynamic] [--reuse] [key=value ...]

1. SFT once, as the main job does (``conf=sft``), unless ``--sft`` names a model folder.
2. For every method, GRPO from that folder (``conf=<preset> stage=grpo``), then the evaluation
   of its output (``stage=eval``), each a ``launch/run.py`` process:
   paper (conf=recipe: format + cosine + Kimi length, summed as published), dapo,
   shorterbetter, laser_d, l1, gfpo (conf/grpo_*.yaml); and each again with
   ``grpo.dynamic_sampling=true`` (unless ``--no-dynamic``). The SFT model is evaluated too.
   Every run has the same data, seed, steps, held-out slice, kept-step rule and evaluation
   (conf=recipe's, which every preset inherits); ``key=value`` overrides go to every run.
3. One table (pass@1 with its 95% bootstrap interval, mean tokens, tokens per correct answer,
   the cut against SFT and against the paper's rewards, whether the pass@1 interval overlaps
   the paper's, GRPO wall time) and one plot (pass@1 against mean tokens, every method,
   interval bars) at ``<run-dir>/length_methods.png``; the table also in ``length_methods.md``.

A method "beats the paper" here when it writes fewer mean tokens than the paper's rewards at
a pass@1 whose interval overlaps theirs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"paper": "recipe", "dapo": "grpo_dapo", "shorterbetter": "grpo_shorterbetter", "laser_d": "grpo_laser_d",
           "l1": "grpo_l1", "gfpo": "grpo_gfpo"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def launch(args: list[str], log: Path) -> float:
    """``launch/run.py args`` with its output in ``log``; returns the wall time (s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *args], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"launch/run.py {' '.join(args)} failed (exit {done.returncode}); its log: {log}")
    return time.perf_counter() - t0


def evaluation(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "report.json").read_text())["evaluations"]


def run_method(name: str, dynamic: bool, sft: Path, out: Path, overrides: list[str], reuse: bool) -> dict:
    """GRPO with the method's preset from ``sft``, then the evaluation of its output; with
    ``reuse``, the result an earlier run of this benchmark left in the method's directory."""
    label = name + (" + dynamic sampling" if dynamic else "")
    run_dir = out / (name + ("_dynamic" if dynamic else ""))
    if reuse and (run_dir / "result.json").is_file():
        print(f"{label}: reusing {run_dir / 'result.json'}", flush=True)
        return json.loads((run_dir / "result.json").read_text())
    extra = ["grpo.dynamic_sampling=true"] if dynamic else []
    print(f"[{time.strftime('%H:%M:%S')}] {label}: GRPO ...", flush=True)
    wall = launch([f"conf={PRESETS[name]}", "stage=grpo", f"grpo.init_from={sft}", f"run.dir={run_dir}",
                   f"run.name={run_dir.name}", *extra, *overrides], run_dir / "grpo.log")
    launch([f"conf={PRESETS[name]}", "stage=eval", f"eval.checkpoint={run_dir / 'grpo' / 'final'}",
            f"run.dir={run_dir / 'eval_run'}", *extra, *overrides], run_dir / "eval.log")
    rows = evaluation(run_dir / "eval_run")
    kept = json.loads((run_dir / "grpo" / "kept.json").read_text()) if (run_dir / "grpo" / "kept.json").exists() else {}
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    grpo = [s for s in steps if s.get("stage") == "grpo"]
    result = {"method": label, "grpo_wall_s": wall, "kept_step": kept.get("step"),
              "generated_per_step": sum(s["completion/mean_tokens"] for s in grpo) / max(len(grpo), 1),
              "rounds": sum(s.get("dynamic/rounds", 1.0) for s in grpo) / max(len(grpo), 1),
              "evaluations": rows}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    main = rows[0]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: pass@1 {100 * main['pass@1']:.1f}% "
          f"{main['mean_output_tokens']:.1f} tokens, GRPO {wall:.0f} s", flush=True)
    return result


def overlaps(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def table(results: list[dict], sft: dict) -> str:
    paper = next((r["evaluations"][0] for r in results if r["method"] == "paper"), None)
    lines = ["| method | pass@1 [95% CI] | mean tokens | tokens / correct | vs SFT | vs paper | CI overlaps paper's "
             "| kept step | GRPO wall |",
             "|---|---:|---:|---:|---:|---:|:---:|---:|---:|"]

    def line(label: str, row: dict, wall: str, kept: str) -> str:
        ci = row["pass@1_ci95"]
        vs_sft = 100 * (row["mean_output_tokens"] / sft["mean_output_tokens"] - 1)
        vs_paper = overlap = "-"
        if paper is not None and label not in ("paper", "SFT (start)"):
            vs_paper = f"{100 * (row['mean_output_tokens'] / paper['mean_output_tokens'] - 1):+.1f}%"
            overlap = "yes" if overlaps(ci, paper["pass@1_ci95"]) else "no"
        per_correct = row.get("tokens_per_correct")
        return (f"| {label} | {100 * row['pass@1']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | "
                f"{row['mean_output_tokens']:.1f} | {'-' if per_correct is None else f'{per_correct:.1f}'} | "
                f"{vs_sft:+.1f}% | {vs_paper} | {overlap} | {kept} | {wall} |")

    lines.append(line("SFT (start)", sft, "-", "-"))
    for r in results:
        for row in r["evaluations"]:
            suffix = row["model"].partition("|")[2]
            label = r["method"] + (f" ({suffix}-token prompt)" if suffix else "")
            lines.append(line(label, row, f"{r['grpo_wall_s']:.0f} s" if not suffix else "", str(r["kept_step"])))
    return "\n".join(lines) + "\n"


def plot(results: list[dict], sft: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [("SFT (start)", sft, "k", "s")]
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(PRESETS):
        for r in results:
            if r["method"].split(" + ")[0] == name:
                points.append((r["method"], r["evaluations"][0], colors(i), "o" if " + " not in r["method"] else "^"))
    for label, row, color, marker in points:
        lo, hi = row["pass@1_ci95"]
        ax.errorbar(row["mean_output_tokens"], 100 * row["pass@1"],
                    yerr=[[100 * (row["pass@1"] - lo)], [100 * (hi - row["pass@1"])]], fmt=marker, color=color,
                    capsize=3, label=label)
    ax.set_xlabel("mean output tokens (evaluation budget)")
    ax.set_ylabel("pass@1 (%), 95% bootstrap interval")
    ax.set_title("Length-control methods from one SFT checkpoint (o: as preset, ^: + dynamic sampling)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "length_methods")
    parser.add_argument("--sft", type=Path, default=None, help="an SFT model folder (default: train one)")
    parser.add_argument("--methods", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-sampling variants")
    parser.add_argument("--reuse", action="store_true",
                        help="take a method's result from <run-dir>/<method>/result.json where an earlier run left it")
    args, overrides = parser.parse_known_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(PRESETS)}")
    out = args.run_dir.resolve()
    started = time.perf_counter()
    sft = args.sft
    if sft is None:
        print(f"[{time.strftime('%H:%M:%S')}] SFT (conf=sft) ...", flush=True)
        launch(["conf=sft", f"run.dir={out / 'sft_run'}", *overrides], out / "sft_run" / "sft.log")
        sft = out / "sft_run" / "sft" / "final"
    launch(["conf=recipe", "stage=eval", f"eval.checkpoint={sft}", f"run.dir={out / 'sft_eval'}", *overrides],
           out / "sft_eval" / "eval.log")
    sft_row = evaluation(out / "sft_eval")[0]
    results = [run_method(m, dynamic, sft.resolve(), out, overrides, args.reuse)
               for m in methods for dynamic in ([False] if args.no_dynamic else [False, True])]
    text = table(results, sft_row)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{stamp}; {machine()}; overrides: {' '.join(overrides) or 'none'}; "
              f"total {(time.perf_counter() - started) / 60:.1f} min\n\n")
    (out / "length_methods.md").write_text(header + text)
    (out / "length_methods.json").write_text(json.dumps({"sft": sft_row, "results": results}, indent=1))
    plot(results, sft_row, out / "length_methods.png")
    print("\n" + header + text, flush=True)
    print(f"plot: {out / 'length_methods.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
