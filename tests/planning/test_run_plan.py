"""``run.plan=true``: the paper configuration is checked for 8 ranks and its per-GPU memory
printed without a model's weights; layouts that cannot run fail naming the key to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastmath_nemo.preflight import ConfigError, load_config
from fastmath_nemo.planning import memory as m
from fastmath_nemo.planning.plan import build_plan, check_fits

ROOT = Path(__file__).resolve().parents[2]
# DeepSeek-R1-Distill-Qwen-14B's config.json, the fields the plan reads
R1_14B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 1000000.0,
}
PLAN = ["run.plan=true", "run.plan_world_size=8", "run.plan_gpu_memory_gib=80"]


@pytest.fixture
def config_only(tmp_path: Path) -> Path:
    """A model folder with config.json and nothing else: loading weights from it would fail."""
    folder = tmp_path / "DeepSeek-R1-Distill-Qwen-14B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(R1_14B_CONFIG))
    return folder


def test_paper_plan_prints_the_table_from_config_json_alone(tmp_path: Path, config_only: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "run.py"), "conf=paper_14b", f"model.path={config_only}",
         f"run.dir={run_dir}", *PLAN], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "8 ranks = TP 4 x PP 1 x CP 1 x DP 2 (sequence parallel)" in out
    assert "14.77B parameters" in out and str(config_only / "config.json") in out
    rows = {line[:38].strip(): line[38:].split() for line in out.splitlines() if line[38:].strip()}
    # hand-derived in test_memory_estimate: 3,692,880,896 parameters per rank at TP 4
    assert rows["weights (bf16)"] == ["6.9", "6.9", "6.9"]           # x 2 bytes
    assert rows["gradients (fp32)"] == ["13.8", "13.8", "13.8"]      # x 4
    assert rows["optimizer (fp32 main + Adam, /2)"] == ["20.6", "20.6", "20.6"]  # x 12 / DP 2
    assert rows["activations (recomputed)"][0] == "3.6"               # 3,840,000,000 bytes at 24,000 tokens
    assert rows["vLLM (0.3 x GPU)"] == ["0.0", "0.0", "24.0"]        # asleep while training; 0.3 x 80 GiB
    assert "peak: " in out and ": fits" in out
    # vLLM under torchrun: one engine of TP 4 per model replica, nothing refused at start-up
    assert "runs today: yes" in out and "vLLM: 2 engine(s) of TP 4" in out
    assert not run_dir.exists()  # a plan writes nothing


def test_paper_config_fits_80gb_at_tp8_and_tp4(config_only: Path) -> None:
    for tp in (4, 8):
        cfg = load_config("paper_14b", [f"model.path={config_only}", *PLAN,
                                        f"policy.megatron.tensor_parallel_size={tp}"])
        plan = build_plan(cfg)
        check_fits(plan, cfg)  # no error
        phase, peak = plan.peak()
        assert phase == "rollout" and peak <= 80 * m.GIB


def test_plan_without_the_model_folder_uses_the_built_in_architecture() -> None:
    plan = build_plan(load_config("paper_14b", PLAN))
    assert "built-in description of DeepSeek-R1-Distill-Qwen-14B" in "\n".join(plan.title)


def test_torchrun_launch_with_vllm_checks_the_engine_layout(config_only: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    pytest.importorskip("vllm")  # a launch (not a plan) needs vLLM installed
    assert load_config("paper_14b", [f"model.path={config_only}"]).generation.vllm.tensor_parallel_size == 4
    with pytest.raises(ConfigError) as info:
        load_config("paper_14b", [f"model.path={config_only}", "generation.vllm.tensor_parallel_size=3"])
    assert "config key 'generation.vllm.tensor_parallel_size'" in str(info.value) and "world size (8)" in str(info.value)


@pytest.mark.parametrize(("overrides", "key"), [
    # 40 heads are not divisible by 16 (the folder is absent: the plan's own check)
    (["run.plan_world_size=16", "grpo.prompts_per_step=16", "policy.megatron.tensor_parallel_size=16"],
     "policy.megatron.tensor_parallel_size"),
    (["run.plan_world_size=20", "grpo.prompts_per_step=20", "policy.megatron.pipeline_parallel_size=5"],
     "policy.megatron.pipeline_parallel_size"),
    (["generation.vllm.tensor_parallel_size=16"], "generation.vllm.tensor_parallel_size"),
    (["generation.vllm.max_model_len=16384"], "generation.vllm.max_model_len"),
])
def test_impossible_layout_fails_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_plan(load_config("paper_14b", [*PLAN, *overrides]))
    assert f"config key '{key}'" in str(info.value)


@pytest.mark.parametrize(("overrides", "key"), [
    # TP 1: 14.77B x (2 + 4) bytes of weights and gradients alone exceed 80 GiB
    (["policy.megatron.tensor_parallel_size=1", "policy.megatron.sequence_parallel=false"],
     "policy.megatron.tensor_parallel_size"),
    # TP 2 x DP 4 without sharding: 7.4B x 18 bytes = 133 GB; sharded over 4 it is 7.4B x 9 = 67 GB
    (["policy.megatron.tensor_parallel_size=2", "policy.megatron.distributed_optimizer=false"],
     "policy.megatron.distributed_optimizer"),
    # the PyTorch sampler beside a megatron policy holds an fp32 copy of the whole model (59 GB)
    (["generation.backend=torch"], "generation.backend"),
    (["generation.vllm.gpu_memory_utilization=0.6"], "generation.vllm.gpu_memory_utilization"),
])
def test_over_budget_fails_naming_the_key(config_only: Path, overrides: list[str], key: str) -> None:
    cfg = load_config("paper_14b", [f"model.path={config_only}", *PLAN, *overrides])
    with pytest.raises(ConfigError) as info:
        check_fits(build_plan(cfg), cfg)
    assert f"config key '{key}'" in str(info.value)


def test_paper_config_in_one_process_fails_naming_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config("paper_14b")
    assert "config key 'policy.megatron.tensor_parallel_size'" in str(info.value)


def test_paper_plan_sizes_the_checkpoint_host_memory_and_the_preemption_lead(config_only: Path) -> None:
    cfg = load_config("paper_14b", [f"model.path={config_only}", *PLAN, "run.plan_step_s=300",
                                    "run.plan_write_gib_per_s=2"])
    text = "\n".join(build_plan(cfg).beside)
    # 3,692,880,896 parameters per rank at TP 4 x (2 bf16 + 12 fp32 main and Adam) bytes / DP 2
    # = 25,850,166,272 bytes = 24.07 GiB per rank; 8 ranks a node: 192.6 GiB, 96.3 s at 2 GiB/s
    assert "checkpoint: 24.1 GiB per rank, 192.6 GiB per node, 192.6 GiB in all; a save takes 96 s" in text
    rows = {line[:50].strip(): line[50:].strip() for line in text.splitlines()}
    assert rows["KL reference (host copy of the weights + staging)"] == "110.1"  # 8 x 3.69e9 x 2 B x 2 copies
    assert rows["vLLM weights offloaded while training"] == "55.0"  # 8 x 14.77e9 x 2 B / TP 4
    assert rows["asynchronous checkpoint, staged"] == "192.6"  # checkpoint.async_save: each rank's share
    assert rows["Hugging Face folder: one full tensor (rank 0)"] == "1.5"  # 152,064 x 5,120 x 2 B
    assert "--signal=B:USR1@460" in text  # 300 s step + 96.3 s save + 60 s slack, up to a multiple of 10
