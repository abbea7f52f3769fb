"""SFT training throughput of the PyTorch policy against plain transformers, same run.

    python benchmarks/sft_throughput.py --preset tiny            # CPU, seconds
    python benchmarks/sft_throughput.py --preset 1b --device cuda --dtype bfloat16

Both sides train the same Llama-shaped model (random weights) on the same tokens with AdamW:
- baseline: ``model(input_ids, labels=...)`` on unpacked rows, as a plain HF loop does;
- policy:   ``TorchPolicy.train_step`` with ``sft_loss`` on packed rows (several documents
            per row, per-document causal mask and position ids, mixed precision).
Prints tokens/s, MFU and the ratio policy/baseline, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import OptimizerConfig  # noqa: E402
from fastmath_nemo.data.packing import pack_examples  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy, autocast  # noqa: E402

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, row_tokens, rows, doc_tokens)
    "tiny": (128, 4, 4, 2, 384, 512, 512, 8, 128),
    "1b": (2048, 16, 16, 8, 5632, 32000, 4096, 1, 1024),
}
PEAK_TFLOPS = {"cuda": 989.0, "cpu": None}  # H100/H200 dense bf16


def build(preset: str, device: torch.device) -> tuple[torch.nn.Module, tuple]:
    hidden, layers, heads, kv, inter, vocab, *_ = spec = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device), spec


def flops_per_token(model: torch.nn.Module, spec: tuple, context: int) -> float:
    hidden, layers = spec[0], spec[1]
    n = sum(p.numel() for p in model.parameters())
    return 6.0 * n + 12.0 * layers * hidden * context  # weights + attention (Kaplan et al.)


def time_steps(step, n_steps: int, device: torch.device) -> float:
    times = []
    for _ in range(n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first step includes allocator warm-up


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and core count (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def parse_args(description: str) -> argparse.Namespace:
    """--preset, --device, --dtype, --steps (shared with megatron_sft_throughput.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=6)
    return parser.parse_args()


def random_documents(spec: tuple) -> list[list[int]]:
    """Enough random documents of the preset's length to fill its rows exactly."""
    *_, vocab, row_tokens, rows, doc_tokens = spec
    return [torch.randint(0, vocab, (doc_tokens,)).tolist() for _ in range(rows * row_tokens // doc_tokens)]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    model, spec = build(args.preset, device)
    *_, vocab, row_tokens, rows, doc_tokens = spec
    docs = random_documents(spec)
    tokens = rows * row_tokens

    # Baseline: the plain transformers loop on the same tokens, one document per row.
    flat = torch.tensor(docs, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def baseline_step() -> None:
        with autocast(device, dtype):
            loss = model(input_ids=flat, labels=flat).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base_s = time_steps(baseline_step, args.steps, device)
    opt.state.clear()  # free the baseline's Adam moments before the policy builds its own

    policy = TorchPolicy(model, device, compute_dtype=dtype)
    policy.setup_optimizer(OptimizerConfig(lr=1e-5, warmup_ratio=0.0), total_steps=args.steps + 1)
    batch = pack_examples([(d, [1] * len(d)) for d in docs], max_len=row_tokens, pad_id=0)
    loss_fn = sft_loss  # one micro-batch: its own token count is the step's
    policy_s = time_steps(lambda: policy.train_step([batch], loss_fn), args.steps, device)

    name = machine_name(device)
    peak = PEAK_TFLOPS.get(device.type) if dtype == torch.bfloat16 else None
    print(f"machine: {name}; torch {torch.__version__}; preset {args.preset}; dtype {args.dtype}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {tokens} tokens/step")
    for label, seconds, context in (("transformers loop (unpacked)", base_s, doc_tokens),
                                    ("TorchPolicy.train_step (packed)", policy_s, doc_tokens)):
        tps = tokens / seconds
        mfu = f", MFU {100 * tps * flops_per_token(model, spec, context) / (peak * 1e12):.1f}%" if peak else ""
        print(f"  {label:32s} {tps:10,.0f} tokens/s{mfu}")
    print(f"  ratio policy / baseline: {base_s / policy_s:.2f}")
    if device.type == "cuda":
        print(f"  peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
