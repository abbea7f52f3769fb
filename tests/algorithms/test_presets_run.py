"""Every length-control preset's GRPO settings, with dynamic sampling on, through run_grpo with
the tiny model and the PyTorch sampler (two steps; sizes cut down, nothing else changed): the
methods compose with dynamic sampling and the loop, and each step logs what the method adds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastmath_nemo.algorithms.grpo import run_grpo
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.config.schema import GenerationConfig
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.torch_policy import TorchPolicy
from fastmath_nemo.preflight import load_config
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics

SMALL = ["grpo.steps=2", "grpo.prompts_per_step=2", "grpo.eval_every_steps=0", "grpo.keep=last",
         "grpo.dynamic_sampling=true", "grpo.dynamic_sampling_max_rounds=1"]
PRESETS = {"grpo_dapo": [], "grpo_shorterbetter": [], "grpo_laser_d": [], "grpo_l1": [],
           "grpo_gfpo": ["grpo.num_generations=4", "grpo.gfpo.keep=2"]}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_with_dynamic_sampling(name, tiny_task, tmp_path) -> None:
    cfg = load_config(name, SMALL + PRESETS[name])
    torch.manual_seed(0)
    policy = TorchPolicy(tiny_task.varied_model(seed=4, std=0.1), torch.device("cpu"), temperature=1.0,
                         micro_batching=MicroBatching(rows=8))
    generator = TorchGenerator(policy.model, tiny_task.pad_id, max_rows=8)
    gen_cfg = dataclasses.replace(GenerationConfig(), max_tokens=16)
    checkpoints = CheckpointManager(tmp_path / "grpo", tiny_task.tokenizer, 1)
    with MetricsLogger(tmp_path / "metrics.jsonl", enabled=True) as metrics:
        run_grpo(policy, generator, tiny_task.tokenizer, tiny_task.train[:20], cfg.grpo, gen_cfg, None, checkpoints,
                 metrics, seed=1)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert 1 <= record["dynamic/rounds"] <= 2 and 0.0 <= record["dynamic/kept_share"] <= 1.0
        assert record["dynamic/trained_groups"] <= 2
        assert ("loss" in record) == (record["dynamic/trained_groups"] > 0)
        assert all(f"reward/{r.name}" in record for r in cfg.grpo.rewards)
        if cfg.grpo.gfpo.keep is not None:
            assert record["gfpo/kept_mean_tokens"] <= record["completion/mean_tokens"] + 1e-9
    assert (tmp_path / "grpo" / "final").is_dir()
