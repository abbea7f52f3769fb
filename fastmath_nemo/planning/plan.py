"""``run.plan=true``: check a configuration for its world size and estimate per-GPU memory.

Reads at most the model folder's ``config.json`` (or a built-in description of the
architecture when the folder is not on this machine); loads no weights, starts no process
group, writes nothing. The estimate follows :mod:`fastmath_nemo.planning.memory` (formula in
its docstring and in ``docs/memory.md``) for three moments of a run:

- the SFT step and the GRPO step: weights, gradients, optimizer states, the activations of one
  micro-batch at the configured lengths, the logprob buffer, and the generator's resident part
  (vLLM's share when it stays awake, the PyTorch sampler's model copy);
- the rollout: the static training state plus the generator (vLLM's ``gpu_memory_utilization``
  of the GPU, or the sampler's copy and KV cache).

A layout that cannot run, or a peak over the GPU's memory, raises ``ConfigError`` naming the
key to change.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastmath_nemo.config.errors import ConfigError
from fastmath_nemo.config.schema import Config
from fastmath_nemo.planning import host
from fastmath_nemo.planning import memory as m
from fastmath_nemo.utils.topology import vllm_tensor_parallel_size, world_size_for

# An H100 SXM 80GB as torch.cuda reports it; the default GPU of a plan made without one.
H100_80GB_BYTES = 85_520_809_984
# CUDA context, NCCL and cuBLAS workspaces and allocator slack per process (an assumption,
# not a measurement: megatron users commonly leave 2-3 GiB).
FRAMEWORK_OVERHEAD_BYTES = 2 * m.GIB
PHASES = ("SFT step", "GRPO step", "rollout")
# Seconds a preemption needs beyond the step and the save: decoding steps until a generator
# sees the stop, the collective that spreads it, and the processes' exit.
PREEMPTION_SLACK_S = 60


@dataclass
class MemoryPlan:
    """Per-GPU bytes of each component at each phase, and what the plan found."""

    title: list[str]
    gpu_bytes: int
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> phase -> bytes
    notes: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # start-up refusals the config would meet today
    static: int = 0  # weights + gradients + optimizer states: held at every phase
    beside: list[str] = field(default_factory=list)  # host memory, checkpoint size and save time

    def total(self, phase: str) -> int:
        return sum(parts.get(phase, 0) for parts in self.rows.values())

    def peak(self) -> tuple[str, int]:
        phase = max(PHASES, key=self.total)
        return phase, self.total(phase)

    def format(self) -> str:
        """The table the CLI prints, in GiB."""
        width = max(len(name) for name in [*self.rows, "total"]) + 2
        lines = [*self.title, "", f"{'per GPU, GiB':{width}s}" + "".join(f"{p:>12s}" for p in PHASES)]
        for name, parts in [*self.rows.items(), ("total", {p: self.total(p) for p in PHASES})]:
            cells = "".join(f"{parts[p] / m.GIB:12.1f}" if p in parts else f"{'-':>12s}" for p in PHASES)
            lines.append(f"{name:{width}s}{cells}")
        phase, peak = self.peak()
        fits = "fits" if peak <= self.gpu_bytes else "DOES NOT FIT"
        lines += ["", f"peak: {peak / m.GIB:.1f} GiB ({phase}) of {self.gpu_bytes / m.GIB:.1f} GiB per GPU: {fits}"]
        lines += [f"note: {note}" for note in self.notes]
        lines += ["", *self.beside] if self.beside else []
        blockers = self.blockers if peak <= self.gpu_bytes else ["the estimate is over the GPU's memory", *self.blockers]
        lines += [f"runs today: no: {b}" for b in blockers] or ["runs today: yes"]
        return "\n".join(lines)


def model_shape(cfg: Config) -> tuple[m.ModelShape, str]:
    """The architecture to plan for and where it came from (config.json, built-in, tiny)."""
    if cfg.model.path is None and cfg.model.preset is None:
        t = cfg.model.tiny
        shape = m.ModelShape(hidden=t.hidden_size, layers=t.num_layers, heads=t.num_attention_heads,
                             kv_heads=t.num_key_value_heads, head_dim=t.hidden_size // t.num_attention_heads,
                             intermediate=t.intermediate_size, vocab=cfg.model.tokenizer_vocab_size,
                             tied_embeddings=t.tie_word_embeddings, qkv_bias=t.architecture == "qwen2",
                             max_positions=t.max_position_embeddings)
        return shape, "the embedded tiny model (model.tiny)"
    folder = Path(cfg.model.path) if cfg.model.path else Path(cfg.model.cache_dir).expanduser() / str(cfg.model.preset)
    config_file = folder / "config.json"
    if config_file.is_file():
        return m.ModelShape.from_hf_config(json.loads(config_file.read_text())), str(config_file)
    builtin = m.BUILTIN_SHAPES.get(folder.name)
    if builtin is not None:
        return builtin, f"built-in description of {folder.name}; {config_file} is not on this machine"
    key = "model.path" if cfg.model.path else "model.preset"
    raise ConfigError(f"config key '{key}': run.plan needs {config_file} (only config.json is read) or a model "
                      f"named like one of {', '.join(m.BUILTIN_SHAPES)}")


def _gpu_bytes(cfg: Config) -> tuple[int, str]:
    if cfg.run.plan_gpu_memory_gib is not None:
        return int(cfg.run.plan_gpu_memory_gib * m.GIB), "run.plan_gpu_memory_gib"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    return H100_80GB_BYTES, "an H100 80GB; set run.plan_gpu_memory_gib for another GPU"


def _layout(cfg: Config, world: int) -> m.Layout:
    if cfg.policy.backend != "megatron":
        return m.Layout(world=world)  # the PyTorch backend: a full replica per rank (DDP)
    mc = cfg.policy.megatron
    return m.Layout(world=world, tp=mc.tensor_parallel_size, pp=mc.pipeline_parallel_size,
                    cp=mc.context_parallel_size, sequence_parallel=mc.sequence_parallel)


def _check_layout(shape: m.ModelShape, layout: m.Layout, cfg: Config) -> None:
    """What megatron and vLLM would refuse at start-up, from the shape alone."""
    tp_key = "policy.megatron.tensor_parallel_size"
    if shape.heads % layout.tp or shape.kv_heads % layout.tp:
        raise ConfigError(f"config key '{tp_key}': {layout.tp} must divide the attention heads ({shape.heads}) and "
                          f"key/value heads ({shape.kv_heads})")
    if shape.layers % layout.pp:
        raise ConfigError(f"config key 'policy.megatron.pipeline_parallel_size': {layout.pp} must divide the "
                          f"number of layers ({shape.layers})")
    if layout.world % (layout.tp * layout.pp * layout.cp):
        raise ConfigError(f"config key '{tp_key}': world size {layout.world} is not divisible by TP x PP x CP = "
                          f"{layout.tp * layout.pp * layout.cp}")
    if cfg.generation.backend == "vllm":
        vtp = vllm_tensor_parallel_size(cfg)
        if layout.world % vtp or shape.kv_heads % vtp:
            raise ConfigError(f"config key 'generation.vllm.tensor_parallel_size': {vtp} must divide the world size "
                              f"({layout.world}) and the key/value heads ({shape.kv_heads})")


def _micro_tokens(row: int, budget: int | None, rows: int) -> int:
    """Tokens of the largest micro-batch when every row has ``row`` tokens: a token budget
    takes as many whole rows as fit (at least one), else ``policy.micro_batch_rows`` rows."""
    return row * (max(1, budget // row) if budget is not None else rows)


def build_plan(cfg: Config, world: int | None = None) -> MemoryPlan:
    """The per-GPU estimate of ``cfg`` at ``world`` ranks (default: ``world_size_for(cfg)``)."""
    world = world_size_for(cfg) if world is None else world
    shape, source = model_shape(cfg)
    layout = _layout(cfg, world)
    _check_layout(shape, layout, cfg)
    gpu_bytes, gpu_name = _gpu_bytes(cfg)
    pol, megatron = cfg.policy, cfg.policy.backend == "megatron"
    precision = m.Precision.megatron(pol.dtype) if megatron else m.Precision.torch(pol.dtype)
    distributed = megatron and pol.megatron.distributed_optimizer
    recompute = pol.megatron.recompute_activations if megatron else pol.gradient_checkpointing
    b = precision.activation

    sft_row = cfg.sft.max_seq_len
    grpo_row = cfg.run.plan_prompt_tokens + cfg.generation.max_tokens
    budget = pol.max_tokens_per_micro_batch
    tokens = {"SFT step": _micro_tokens(sft_row, budget, pol.micro_batch_rows),
              "GRPO step": _micro_tokens(grpo_row, budget, pol.micro_batch_rows)}
    row_of = {"SFT step": sft_row, "GRPO step": grpo_row}

    plan = MemoryPlan(title=[
        f"per-GPU memory plan: {cfg.run.name}, {world} ranks = TP {layout.tp} x PP {layout.pp} x CP {layout.cp} x "
        f"DP {layout.dp}{' (sequence parallel)' if layout.sequence_parallel else ''}, policy.backend={pol.backend}, "
        f"{pol.dtype}" + (" with fp32 main weights" if megatron and pol.dtype == "bfloat16" else ""),
        f"model: {shape.total_params() / 1e9:.2f}B parameters, {shape.layers} layers, hidden {shape.hidden}, heads "
        f"{shape.heads}/{shape.kv_heads}, MLP {shape.intermediate}, vocabulary {shape.vocab:,} ({source})",
        f"GPU: {gpu_bytes / m.GIB:.1f} GiB ({gpu_name})",
        f"micro-batch: SFT {tokens['SFT step'] // sft_row} x {sft_row:,} tokens, GRPO {tokens['GRPO step'] // grpo_row}"
        f" x {grpo_row:,} ({cfg.run.plan_prompt_tokens} prompt + {cfg.generation.max_tokens:,} completion); "
        f"logprobs in chunks of {pol.logprob_chunk_tokens or 'all'} tokens; recomputation {'on' if recompute else 'off'}",
    ], gpu_bytes=gpu_bytes)

    static = m.static_bytes(shape, layout, precision, distributed)
    shards = f"/{layout.dp * layout.cp}" if distributed else "not sharded"
    labels = {"weights": f"weights ({'bf16' if precision.weight == 2 else 'fp32'})",
              "gradients": "gradients (fp32)",
              "optimizer": f"optimizer ({'fp32 main + ' if precision.optimizer == 12 else ''}Adam, {shards})"}
    for key, value in static.items():
        plan.rows[labels[key]] = dict.fromkeys(PHASES, value)
    plan.static = sum(static.values())
    act_row, lp_row = f"activations ({'recomputed' if recompute else 'stored'})", "logprob buffer"
    plan.rows[act_row], plan.rows[lp_row] = {}, {}
    for phase, n in tokens.items():
        dense = pol.packed_attention == "dense" and phase == "SFT step" and cfg.sft.packing
        plan.rows[act_row][phase] = m.activation_bytes(shape, layout, n, b, recompute=recompute,
                                                       dense_rows=n // row_of[phase] if dense else 0,
                                                       row_tokens=row_of[phase])
        plan.rows[lp_row][phase] = m.logprob_bytes(shape, layout, n, pol.logprob_chunk_tokens, b)
    if pol.logprob_chunk_tokens:
        full = max(m.logprob_bytes(shape, layout, n, 0, b) for n in tokens.values())
        plan.notes.append(f"without chunked logprobs (policy.logprob_chunk_tokens=0) the logits would take "
                          f"{full / m.GIB:.1f} GiB")
    if pol.packed_attention == "dense" and cfg.sft.packing:
        plan.notes.append("policy.packed_attention=dense: a [rows, T, T] mask and a score matrix per layer (T^2)")

    _generator_rows(cfg, shape, layout, precision, gpu_bytes, grpo_row, plan)
    plan.beside = _beside_the_gpus(cfg, shape, layout, precision, megatron)
    plan.rows["framework overhead"] = dict.fromkeys(PHASES, FRAMEWORK_OVERHEAD_BYTES)
    if cfg.grpo.beta > 0:
        plan.notes.append("grpo.beta > 0: reference logprobs from host-held weights (no second model on the GPU)")
    if megatron and importlib.util.find_spec("megatron.core") is None:
        plan.notes.append("megatron-core is not installed on this machine (pip install -e '.[megatron]')")
    missing = [p for p in (cfg.model.path, cfg.sft.init_from) if p is not None and not Path(p).expanduser().is_dir()]
    if missing:
        plan.notes.append(f"not on this machine (needed to run): {', '.join(missing)}")
    return plan


def _generator_rows(cfg: Config, shape: m.ModelShape, layout: m.Layout, precision: m.Precision, gpu_bytes: int,
                    grpo_row: int, plan: MemoryPlan) -> None:
    """The generator's resident share at each phase, and its own checks."""
    gen = cfg.generation
    if gen.backend == "vllm":
        v = gen.vllm
        vtp = vllm_tensor_parallel_size(cfg)
        share = int(v.gpu_memory_utilization * gpu_bytes)
        awake = v.sleep_level == 0
        plan.rows[f"vLLM ({v.gpu_memory_utilization:g} x GPU)"] = {
            "SFT step": share if awake and cfg.sft.eval_every_epoch else 0,
            "GRPO step": share if awake else 0, "rollout": share}
        if not awake:
            plan.notes.append("generation.vllm.sleep_level=1: vLLM frees its KV cache and offloads its weights "
                              "while the policy trains")
        kv_tokens = m.vllm_kv_tokens(shape, share, vtp)
        longest = cfg.run.plan_prompt_tokens + max(gen.max_tokens, *cfg.eval.token_budgets)
        max_len = v.max_model_len or shape.max_positions
        if kv_tokens < max(max_len, 1):
            raise ConfigError(
                f"config key 'generation.vllm.gpu_memory_utilization': {v.gpu_memory_utilization} x "
                f"{gpu_bytes / m.GIB:.1f} GiB leaves KV cache for {kv_tokens:,} tokens per engine (weights "
                f"{shape.total_params() * 2 / vtp / m.GIB:.1f} GiB per rank at TP "
                f"{vtp}), less than one sequence of max_model_len {max_len:,}")
        if v.max_model_len is not None and v.max_model_len < longest:
            raise ConfigError(f"config key 'generation.vllm.max_model_len': {v.max_model_len} is shorter than the "
                              f"longest sequence ({longest:,}: prompt + the largest completion or eval budget)")
        engines = layout.world // vtp
        plan.notes.append(f"vLLM: {engines} engine(s) of TP {vtp}, KV cache for {kv_tokens:,} "
                          f"tokens each ({kv_tokens // grpo_row} GRPO rows of {grpo_row:,} at once)")
        return
    # The PyTorch sampler decodes with a TorchPolicy's own module, or with an fp32
    # transformers copy of the whole model next to a megatron policy.
    per_rank = cfg.grpo.prompts_per_step * cfg.grpo.num_generations // max(1, layout.dp)
    rows = max(1, min(gen.max_rows, per_rank))
    kv = rows * grpo_row * shape.kv_cache_bytes_per_token(precision.activation)
    copy = shape.total_params() * 4 if cfg.policy.backend == "megatron" else 0
    if copy:
        plan.rows["sampler copy (fp32, full model)"] = dict.fromkeys(PHASES, copy)
    plan.rows[f"sampler KV cache ({rows} rows)"] = {"rollout": kv}


def _beside_the_gpus(cfg: Config, shape: m.ModelShape, layout: m.Layout, precision: m.Precision,
                     megatron: bool) -> list[str]:
    """Host memory per node, the checkpoint's size and save time, and the --signal lead time a
    preemption needs (``planning.host``)."""
    run, vllm = cfg.run, cfg.generation.vllm
    offload = vllm_tensor_parallel_size(cfg) if cfg.generation.backend == "vllm" and vllm.sleep_level > 0 else None
    needs = host.host_needs(shape, layout, precision, megatron=megatron, ranks_per_node=run.plan_gpus_per_node,
                            reference=cfg.grpo.beta > 0, vllm_offload_tp=offload,
                            async_save=cfg.checkpoint.async_save)
    ranks = min(run.plan_gpus_per_node, layout.world)
    width = max(len(name) for name in needs.items) + 2
    lines = [f"{f'host memory per node ({ranks} ranks), GiB':{width}s}"]
    lines += [f"{name:{width}s}{value / m.GIB:12.1f}" for name, value in needs.items.items()]
    lines.append(f"{'total':{width}s}{sum(needs.items.values()) / m.GIB:12.1f}")
    per_node = needs.checkpoint_per_rank * (ranks if megatron else 1)
    save_s = per_node / (run.plan_write_gib_per_s * m.GIB)
    lead = math.ceil((run.plan_step_s + save_s + PREEMPTION_SLACK_S) / 10) * 10
    lines += ["", f"checkpoint: {needs.checkpoint_per_rank / m.GIB:.1f} GiB per rank, {per_node / m.GIB:.1f} GiB per "
              f"node, {needs.checkpoint_total / m.GIB:.1f} GiB in all; a save takes {save_s:.0f} s at "
              f"run.plan_write_gib_per_s={run.plan_write_gib_per_s:g} GiB/s per node",
              f"preemption: a stop request waits for the step in progress (run.plan_step_s={run.plan_step_s:g} s; "
              f"rollouts and evaluations are abandoned) and the save: launch with --signal=B:USR1@{lead} "
              f"(launch/slurm/fastmath.sbatch)"]
    return lines


def check_fits(plan: MemoryPlan, cfg: Config) -> None:
    """Raise ``ConfigError`` naming the key most likely to bring an over-budget peak down."""
    phase, peak = plan.peak()
    if peak <= plan.gpu_bytes:
        return
    pol, mc = cfg.policy, cfg.policy.megatron
    data_parallel = world_size_for(cfg) // (mc.tensor_parallel_size * mc.pipeline_parallel_size)
    if pol.backend != "megatron":
        key = "policy.backend"  # a full replica with fp32 weights and AdamW states per GPU
    elif plan.static + FRAMEWORK_OVERHEAD_BYTES > plan.gpu_bytes:  # the model state alone is too big
        distributed = mc.distributed_optimizer or data_parallel == 1
        key = "policy.megatron.tensor_parallel_size" if distributed else "policy.megatron.distributed_optimizer"
    elif cfg.generation.backend == "torch" and phase == "rollout":
        key = "generation.backend"  # the PyTorch sampler's fp32 copy of the whole model
    elif cfg.generation.backend == "vllm" and phase == "rollout":
        key = "generation.vllm.gpu_memory_utilization"
    elif not mc.recompute_activations:
        key = "policy.megatron.recompute_activations"
    elif pol.logprob_chunk_tokens == 0:
        key = "policy.logprob_chunk_tokens"
    else:
        key = "policy.max_tokens_per_micro_batch"
    raise ConfigError(f"config key '{key}': the per-GPU estimate peaks at {peak / m.GIB:.1f} GiB ({phase}), over "
                      f"the GPU's {plan.gpu_bytes / m.GIB:.1f} GiB (the table above itemises it)")


def run_plan(cfg: Config) -> dict[str, object]:
    """Build, print (on rank 0) and check the plan; returns it for callers and tests."""
    plan = build_plan(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(plan.format(), flush=True)  # the plan is the product's output in this mode
    check_fits(plan, cfg)
    return {"plan": plan}
