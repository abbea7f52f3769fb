"""SFT throughput of the Megatron backend against the PyTorch backend, same model, same run.

    python benchmarks/megatron_sft_throughput.py --preset tiny                       # CPU, a minute
    python benchmarks/megatron_sft_throughput.py --preset 1b --device cuda --dtype bfloat16

Both policies train the same Llama-shaped model (random weights, saved once as a Hugging
Face folder) on the same packed rows (several documents per row, per-document causal mask)
with ``sft_loss`` and AdamW:
- baseline: ``TorchPolicy.train_step`` (transformers, SDPA, autocast over fp32 weights);
- megatron: ``MegatronPolicy.train_step`` (megatron-core GPTModel, SDPA core attention, bf16
            parameters with fp32 main weights in megatron's optimizer);
- and, where Transformer Engine and an FP8 GPU are present, the Megatron backend with TE's
  layer spec in bf16 and in FP8 (hybrid, delayed scaling).
Prints tokens/s, MFU and the ratios against the baseline, and the machine. One GPU, TP = PP = 1.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sft_throughput import (  # noqa: E402
    PEAK_TFLOPS,
    build,
    flops_per_token,
    machine_name,
    parse_args,
    random_documents,
    time_steps,
)

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig, OptimizerConfig  # noqa: E402
from fastmath_nemo.data.packing import pack_examples  # noqa: E402
from fastmath_nemo.policy.megatron.policy import MegatronPolicy  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402


def fp8_available() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
            and importlib.util.find_spec("transformer_engine") is not None)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    model, spec = build(args.preset, device)
    *_, row_tokens, rows, doc_tokens = spec
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    flops = flops_per_token(model, spec, doc_tokens)
    docs = random_documents(spec)
    batch = pack_examples([(d, [1] * len(d)) for d in docs], max_len=row_tokens, pad_id=0)
    loss_fn = sft_loss  # one micro-batch: its own token count is the step's
    tokens = rows * row_tokens
    optimizer = OptimizerConfig(lr=1e-5, warmup_ratio=0.0)
    results: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory() as folder:
        model.to(dtype).save_pretrained(folder)  # the Megatron side starts from this HF folder
        model.float()
        baseline = TorchPolicy(model, device, compute_dtype=dtype)
        baseline.setup_optimizer(optimizer, total_steps=args.steps + 1)
        step = functools.partial(baseline.train_step, [batch], loss_fn)
        results.append(("TorchPolicy (transformers, SDPA)", time_steps(step, args.steps, device)))
        del baseline, model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()

        variants = [("MegatronPolicy (local spec, SDPA)", MegatronConfig(attention_backend="sdpa"))]
        if fp8_available():
            variants += [("MegatronPolicy (TE spec, bf16)", MegatronConfig(attention_backend="te")),
                         ("MegatronPolicy (TE spec, FP8 hybrid)", MegatronConfig(attention_backend="te", fp8="hybrid"))]
        for label, cfg in variants:
            policy = MegatronPolicy(folder, cfg, params_dtype=dtype)
            policy.setup_optimizer(optimizer, total_steps=args.steps + 1)
            step = functools.partial(policy.train_step, [batch], loss_fn)
            results.append((label, time_steps(step, args.steps, device)))
            del policy, step
            if device.type == "cuda":
                torch.cuda.empty_cache()

    name = machine_name(device)
    peak = PEAK_TFLOPS.get(device.type) if dtype == torch.bfloat16 else None
    print(f"machine: {name}; torch {torch.__version__}; preset {args.preset} ({params_m:.1f}M parameters); "
          f"dtype {args.dtype}; {tokens} tokens/step in rows of {row_tokens} packing {doc_tokens}-token documents; "
          f"Transformer Engine/FP8: {'yes' if fp8_available() else 'no'}")
    base_s = results[0][1]
    for label, seconds in results:
        tps = tokens / seconds
        mfu = f", MFU {100 * tps * flops / (peak * 1e12):.1f}%" if peak else ""
        print(f"  {label:38s} {tps:10,.0f} tokens/s{mfu}   x{base_s / seconds:.2f} vs TorchPolicy")


if __name__ == "__main__":
    main()
