"""Peak memory and time of long-context train steps at the paper's vocabulary, before and after
chunked logprobs and per-document packed attention (issue 9, requirement 7).

    python benchmarks/long_context_memory.py                     # full size: minutes on 2 cores
    python benchmarks/long_context_memory.py --scale 0.125       # every length / 8: a quick check
    python benchmarks/long_context_memory.py --also-chunk 4096   # and a column at logprob_chunk_tokens=4096

Model: Qwen2 architecture, vocabulary 152,064 (DeepSeek-R1-Distill-Qwen-14B's), hidden 256,
2 layers, 4 / 2 heads, random weights, fp32 on the CPU, built by ``TorchPolicy`` through
``pipeline.load_policy`` so that the switches are the configuration keys themselves:

- before: ``policy.logprob_chunk_tokens=0`` (whole-row ``[B, T, V]`` logits) and
  ``policy.packed_attention=dense`` (a ``[B, 1, T, T]`` per-document mask);
- after:  the defaults (chunks of 1,024 tokens, recomputed in the backward; attention per document).

Both run with ``policy.gradient_checkpointing=true`` (what a long-context run uses; paper_14b
recomputes every layer): it takes the decoder's activations out of the comparison, so what
differs is the logits and the attention mask. Without it, (a) "after" peaked at 3.9 GB.

Steps: (a) a GRPO train step (``grpo_loss``, beta 0.04) on 2 rows x 16,384 tokens; (b) an SFT
step (``sft_loss``) on one packed 24,000-token row of 12 documents, and the same at 6,000 and
12,000 tokens to show how peak memory grows with T.

Each configuration runs in its own subprocess, so runs do not pollute each other's peak, under
an address-space limit (``--memory-limit-gb``, RLIMIT_AS): a configuration that needs more
fails its allocation and is reported as OOM while the benchmark carries on. Peak memory is the
child's VmHWM (peak resident set), reset after the model and optimizer are built, so it is the
step's peak including the model, its gradients and AdamW states.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 152_064
RECOMPUTE = {"policy.gradient_checkpointing": True}
BEFORE = {**RECOMPUTE, "policy.logprob_chunk_tokens": 0, "policy.packed_attention": "dense"}
AFTER: dict[str, object] = dict(RECOMPUTE)  # otherwise the schema's defaults
GRPO_ROWS, GRPO_TOKENS, GRPO_PROMPT = 2, 16_384, 512
SFT_LENGTHS, SFT_DOCUMENTS = (6_000, 12_000, 24_000), 12


def build_model(folder: Path) -> None:
    """A Qwen2 Hugging Face folder: hidden 256, 2 layers, the paper's vocabulary, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32_768,
                         tie_word_embeddings=False, rope_theta=1e6)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(folder))


def _rss_kib(field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process from /proc, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _grpo_batch(tokens: int):
    """2 rows of ``tokens``: a 512-token prompt, then a completion with one advantage each."""
    import torch

    from fastmath_nemo.batching.batch import Batch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (GRPO_ROWS, tokens), generator=gen)
    mask = torch.zeros(GRPO_ROWS, tokens)
    mask[:, min(GRPO_PROMPT, tokens // 2):] = 1.0
    old = -torch.rand(GRPO_ROWS, tokens, generator=gen) - 11.0  # about log(1 / V)
    return Batch(input_ids=ids, position_ids=torch.arange(tokens).expand(GRPO_ROWS, -1).clone(),
                 document_ids=torch.ones(GRPO_ROWS, tokens, dtype=torch.long), loss_mask=mask,
                 advantages=torch.tensor([1.0, -1.0]), old_logprobs=old, ref_logprobs=old.clone(),
                 rollout_logprobs=old.clone())


def _sft_batch(tokens: int):
    """One row packing 12 documents of ``tokens / 12`` tokens, every token a target."""
    import torch

    from fastmath_nemo.data.packing import pack_examples

    gen = torch.Generator().manual_seed(1)
    length = tokens // SFT_DOCUMENTS
    docs = [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _ in range(SFT_DOCUMENTS)]
    return pack_examples([(d, [1] * len(d)) for d in docs], max_len=length * SFT_DOCUMENTS, pad_id=0)


def child(spec: dict) -> dict:
    """One configuration's step in this (fresh, memory-limited) process; returns the figures."""
    import functools

    import torch

    from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss, sft_loss
    from fastmath_nemo.preflight import load_config
    from fastmath_nemo.config.schema import OptimizerConfig
    from fastmath_nemo.pipeline import Run, load_policy
    from fastmath_nemo.utils.metrics_logger import MetricsLogger

    torch.set_num_threads(spec["threads"])
    overrides = ["policy.device=cpu", "policy.dtype=float32", *(f"{k}={v}" for k, v in spec["keys"].items())]
    cfg = load_config("recipe", overrides)
    run_dir = Path(spec["run_dir"])
    policy = load_policy(Run(cfg, run_dir, torch.device("cpu"), MetricsLogger(run_dir / "metrics.jsonl")),
                         Path(spec["model"]))
    policy.setup_optimizer(OptimizerConfig(lr=1e-6, warmup_ratio=0.0), total_steps=2)
    if spec["step"] == "grpo":
        batch, loss_fn = _grpo_batch(spec["tokens"]), functools.partial(grpo_loss, cfg=GRPOLossConfig(beta=0.04))
    else:
        batch, loss_fn = _sft_batch(spec["tokens"]), sft_loss
    before_kib, reset = _rss_kib("VmRSS"), _reset_peak()
    start = time.perf_counter()
    try:
        policy.train_step([batch], loss_fn)
    except (MemoryError, RuntimeError) as err:  # torch's allocator raises RuntimeError when RLIMIT_AS is hit
        if "alloc" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"oom": True, "error": str(err).splitlines()[0][:200]}
    seconds = time.perf_counter() - start
    peak_kib = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"oom": False, "seconds": seconds, "peak_gb": peak_kib * 1024 / 1e9, "model_gb": before_kib * 1024 / 1e9}


def run_child(spec: dict, limit_gb: float) -> dict:
    """``spec`` in a subprocess under an address-space limit; OOM when it dies of it."""
    def limit() -> None:
        cap = int(limit_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    # malloc failures outside torch's allocator end the process instead (abort, segfault)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"oom": True, "error": f"exit code {done.returncode}: {tail}"}


def _cell(result: dict, limit_gb: float) -> str:
    return f"OOM (> {limit_gb:g} GB)" if result["oom"] else f"{result['peak_gb']:6.2f} GB {result['seconds']:7.1f} s"


def _ratio(before: dict, after: dict, key: str, limit_gb: float) -> str:
    """before / after; where the baseline ran out of memory its peak was at least the limit."""
    if after["oom"]:
        return "-"
    if before["oom"]:
        return f">{limit_gb / after['peak_gb']:.1f}x" if key == "peak_gb" else "n/a"
    return f"{before[key] / after[key]:.2f}x"


def main() -> None:
    from sft_throughput import machine_name

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every length (0.125: a quick check)")
    parser.add_argument("--memory-limit-gb", type=float, default=12.0,
                        help="address-space limit of each configuration's process (the machine's RAM is shared)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--also-chunk", type=int, default=None,
                        help="add an 'after' column with policy.logprob_chunk_tokens=N (e.g. 4096)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    limit = args.memory_limit_gb
    grpo_tokens = int(GRPO_TOKENS * args.scale)
    sft_lengths = [int(t * args.scale) // SFT_DOCUMENTS * SFT_DOCUMENTS for t in SFT_LENGTHS]
    print(f"machine: {machine_name(torch.device('cpu'))}; torch {torch.__version__}; Qwen2 hidden 256 x 2 layers, "
          f"vocabulary {VOCAB:,}, fp32; {args.threads} threads; each run in a process limited to "
          f"{limit:g} GB of address space", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "qwen2"
        build_model(model)
        cases = [("(a) GRPO step, 2 x {:,} tokens".format(grpo_tokens), "grpo", grpo_tokens)]
        cases += [(f"(b) SFT step, 1 packed row of {t:,} ({SFT_DOCUMENTS} documents)", "sft", t) for t in sft_lengths]
        results: dict[tuple[str, int], dict[str, dict]] = {}
        configs = [("before", BEFORE), ("after", AFTER)]
        if args.also_chunk:
            configs.append((f"chunk {args.also_chunk}", {**AFTER, "policy.logprob_chunk_tokens": args.also_chunk}))
        print(f"{'':52s}{'before (chunk 0, dense)':>26s}{'after (defaults)':>26s}{'memory':>10s}{'time':>8s}"
              + "".join(f"{'after, ' + name:>26s}{'memory':>10s}" for name, _ in configs[2:]))
        for label, step, tokens in cases:
            row = {}
            for name, keys in configs:
                spec = {"step": step, "tokens": tokens, "keys": keys, "model": str(model), "threads": args.threads,
                        "run_dir": tempfile.mkdtemp(dir=tmp)}
                row[name] = run_child(spec, limit)
            results[(step, tokens)] = row
            print(f"{label:52s}{_cell(row['before'], limit):>26s}{_cell(row['after'], limit):>26s}"
                  f"{_ratio(row['before'], row['after'], 'peak_gb', limit):>10s}"
                  f"{_ratio(row['before'], row['after'], 'seconds', limit):>8s}"
                  + "".join(f"{_cell(row[name], limit):>26s}{_ratio(row['before'], row[name], 'peak_gb', limit):>10s}"
                            for name, _ in configs[2:]), flush=True)
    after = [results[("sft", t)]["after"] for t in sft_lengths]
    if not any(r["oom"] for r in after):
        model_gb = after[0]["model_gb"]
        growth = ", ".join(f"{t:,}: {r['peak_gb'] - model_gb:.2f} GB" for t, r in zip(sft_lengths, after))
        print(f"(b) after, peak above the loaded model ({model_gb:.2f} GB resident before the step) by length: {growth}")
    print("memory / time columns: before / after (peak memory reduction, speed-up); "
          "OOM: the configuration needed more than the limit")


if __name__ == "__main__":
    main()
