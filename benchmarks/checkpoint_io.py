"""What one training checkpoint costs each rank: extra host memory, and the time the loop waits.

    python benchmarks/checkpoint_io.py              # a 0.2B Qwen2 over 2 CPU ranks (TP=2)
    python benchmarks/checkpoint_io.py --layers 4   # smaller and faster

Two torchrun ranks (gloo) hold a Qwen2 (hidden 1024, 12 layers, vocabulary 32,000, untied:
0.20B parameters) as the megatron policy at TP=2, in fp32, after one SFT step (so Adam has its
moments). Each rank then measures, one after the other:

- **the gathered copy** (the baseline: what ``MegatronPolicy.save`` did before, and every rank
  paid: ``{name: tensor.cpu().clone() for name, tensor in policy.export_weights()}``, the whole
  model in Hugging Face form);
- **a synchronous save** (``policy.save(dir)``: a distributed checkpoint, every rank its shards);
- **an asynchronous save** (``policy.save(dir, asynchronous=True)``), then four training steps,
  each followed by the ``finished(wait=False)`` poll the loops make, until the write is complete.

Extra host memory is the rank's peak resident set during the operation (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) minus its resident set before it, over the
bytes of the rank's shard (its model parameters and optimizer state: what it saves). The loop
is blocked by a synchronous save for the whole call; by an asynchronous one for the call
(staging and forking the writer) plus the polls. The last line reads
``RESULT extra_host_over_shard=<x> async_over_sync_blocking=<y>`` (the worse rank's figures;
targets: at most 1.3 and at most 0.2). Runs alone: another process changes the times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(out: Path, layers: int) -> int:
    """Save a random Qwen2 of ``layers`` layers into ``out``; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def _rss() -> int:
    """This process's resident set, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measured(fn) -> tuple[float, int]:
    """(seconds, extra peak bytes) of ``fn()``."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident set
    before = _rss()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    extra = _peak() - before
    del result
    gc.collect()
    return seconds, extra


def worker(folder: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from fastmath_nemo.algorithms.losses import sft_loss
    from fastmath_nemo.batching.batch import batch_from_sequences
    from fastmath_nemo.config.schema import MegatronConfig, OptimizerConfig
    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    policy = MegatronPolicy(folder, MegatronConfig(tensor_parallel_size=2, attention_backend="sdpa"))
    policy.setup_optimizer(OptimizerConfig(lr=1e-5), total_steps=100)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 32000, (64,), generator=gen).tolist() for _ in range(4)]
    batch = batch_from_sequences(rows, [[1] * 64 for _ in rows], pad_id=0)
    policy.train_step([batch], sft_loss)
    rank = dist.get_rank()
    inner = [o.optimizer for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])]
    shard = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    shard += sum(t.numel() * t.element_size() for o in inner for s in o.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    out = Path(out_dir)

    def folder_for(name: str) -> Path:
        path = out / name
        if rank == 0:
            path.mkdir()
        dist.barrier()
        return path

    gathered_s, gathered_extra = _measured(lambda: {n: t.cpu().clone() for n, t in policy.export_weights()})
    sync_dir = folder_for("sync")
    dist.barrier()
    sync_s, sync_extra = _measured(lambda: policy.save(sync_dir))
    async_dir = folder_for("async")
    dist.barrier()
    pending = []
    call_s, call_extra = _measured(lambda: pending.append(policy.save(async_dir, asynchronous=True)))
    polls_s, steps = 0.0, 0
    done = False
    while not done:
        if steps < 4:
            policy.train_step([batch], sft_loss)
            steps += 1
        start = time.perf_counter()
        done = pending[0].finished(wait=False)
        polls_s += time.perf_counter() - start
        if not done and steps >= 4:
            time.sleep(0.05)
    figures = {"rank": rank, "shard_bytes": shard, "gathered_s": gathered_s, "gathered_extra": gathered_extra,
               "sync_s": sync_s, "sync_extra": sync_extra, "async_call_s": call_s, "async_polls_s": polls_s,
               "async_call_extra": call_extra, "steps_during_async": steps}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        (out / "figures.json").write_text(json.dumps(gathered))
    destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2"
        params = build_model(folder, args.layers)
        out = Path(tmp) / "out"
        out.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(Path(__file__).resolve()), "--worker", str(folder), str(out)],
                       check=True, env=env, cwd=ROOT)
        ranks = json.loads((out / "figures.json").read_text())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; a Qwen2 of {params / 1e9:.2f}B parameters, fp32, TP=2 over 2 ranks (gloo)")
    print(f"{'rank':>4} {'shard GB':>9} {'gathered copy':>22} {'sync save':>22} {'async save (call + polls)':>30}")
    for r in ranks:
        gb = r["shard_bytes"] / 1e9
        print(f"{r['rank']:>4} {gb:9.2f} {r['gathered_s']:8.2f} s {r['gathered_extra'] / r['shard_bytes']:6.2f} x shard"
              f" {r['sync_s']:8.2f} s {r['sync_extra'] / r['shard_bytes']:6.2f} x shard"
              f" {r['async_call_s']:7.2f} + {r['async_polls_s']:.2f} s, {r['steps_during_async']} steps meanwhile")
    extra = max(r["sync_extra"] / r["shard_bytes"] for r in ranks)
    blocking = max((r["async_call_s"] + r["async_polls_s"]) / r["sync_s"] for r in ranks)
    baseline = max(r["gathered_extra"] / r["shard_bytes"] for r in ranks)
    print(f"extra host memory of a save: {extra:.2f} x the rank's shard (the gathered copy: {baseline:.2f} x, "
          f"{baseline / max(extra, 1e-9):.1f} times more)")
    print(f"loop blocked by an asynchronous save: {blocking:.2f} x a synchronous one")
    print(f"RESULT extra_host_over_shard={extra:.2f} async_over_sync_blocking={blocking:.2f}")


if __name__ == "__main__":
    main()
