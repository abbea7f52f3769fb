"""Resuming runs.

- A CLI SFT run SIGKILLed after a few checkpoints leaves complete, loadable checkpoints, and
  ``resume=true`` continues from the last one (not from step 1) to the planned total.
- ``resume=true`` after a finished recipe re-runs neither SFT nor GRPO and reuses the cached
  evaluations.
- In-process: interrupting ``run_sft`` after step k and resuming gives bit-for-bit (<= 1e-6)
  the weights of an uninterrupted run with the same seed (data order, optimizer and
  scheduler state are all restored). The same for ``run_grpo`` on the PyTorch backend (sampler
  refit from the checkpoint, KL reference kept), whose metrics then hold each step once.

Everything is tiny (a 2-layer, 64-wide model, a few dozen problems); the CLI runs use one
thread so they stay out of the way of other work on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastmath_nemo.algorithms.sft import run_sft, step_batches, tokenize_sft  # noqa: E402
from fastmath_nemo.batching.micro_batches import MicroBatching  # noqa: E402
from fastmath_nemo.checkpoint.atomic import is_complete, list_checkpoints  # noqa: E402
from fastmath_nemo.checkpoint.manager import CheckpointManager  # noqa: E402
from fastmath_nemo.config.schema import OptimizerConfig, SFTConfig  # noqa: E402
from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits  # noqa: E402
from fastmath_nemo.data.tokenizer import train_tokenizer  # noqa: E402
from fastmath_nemo.policy.models import TinyModelConfig, build_tiny_model, load_pretrained  # noqa: E402
from fastmath_nemo.policy.optimization import cosine_with_warmup  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics  # noqa: E402
from _sigkill import sigkill_after_checkpoint  # noqa: E402

RUN_PY = ROOT / "launch" / "run.py"

# Small everything. 48 training problems / 8 rows per step = 6 SFT steps per epoch.
TINY = [
    "data.synthetic.n_train=48",
    "data.synthetic.n_eval=4",
    "sft.rows_per_step=8",
    "sft.eval_every_epoch=false",
    "grpo.steps=2",
    "grpo.prompts_per_step=2",
    "grpo.num_generations=2",
    "generation.max_tokens=32",
    "eval.token_budgets=[32]",
    "eval.n_samples=2",
    "eval.k_values=[2]",
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1",
    "model.tiny.intermediate_size=128",
    "policy.device=cpu",
]
STEPS_PER_EPOCH = 6
SFT_LR = 3.0e-3
SFT_WARMUP_RATIO = 0.1  # 2 warmup steps of 24: the kill/resume point can fall after them


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
        timeout=timeout,
    )


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def sft_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["stage"] == "sft"]


def digest_tree(directory: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under ``directory``."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(directory))] = (digest, path.stat().st_mtime_ns)
    return out


def uninterrupted_lrs(cfg: OptimizerConfig, total: int) -> list[float]:
    """The lr of each of ``total`` optimizer steps under the package's schedule run straight
    through (the multiplier TorchPolicy's LambdaLR applies)."""
    warmup = round(cfg.warmup_ratio * total)
    return [cfg.lr * cosine_with_warmup(step, total, warmup, cfg.min_lr_ratio) for step in range(total)]


# -- CLI: SIGKILL mid-SFT, then resume=true -------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_sft_then_resume_continues_after_last_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    epochs = 4
    total = epochs * STEPS_PER_EPOCH
    args = ["conf=sft", *TINY, f"sft.epochs={epochs}", "sft.save_every_steps=1", f"run.dir={run_dir}",
            f"sft.optimizer.lr={SFT_LR}", f"sft.optimizer.warmup_ratio={SFT_WARMUP_RATIO}",
            "sft.optimizer.min_lr_ratio=0"]
    ckpt_root = run_dir / "sft" / "checkpoints"

    sigkill_after_checkpoint([sys.executable, str(RUN_PY), *args], ROOT, cli_env(), ckpt_root,
                             tmp_path / "killed.log", timeout=180)
    assert not is_complete(run_dir / "sft" / "final")

    # The newest complete checkpoint is whole and loadable (weights, tokenizer, optimizer, loop state).
    checkpoints = list_checkpoints(ckpt_root)
    assert checkpoints, "no complete checkpoint survived the kill"
    last_step, last_dir = checkpoints[-1]
    assert 3 <= last_step < total
    for _step, path in checkpoints:
        for name in ("COMPLETE", "config.json", "model.safetensors", "trainer_state.pt", "tokenizer.json"):
            assert (path / name).is_file(), f"{path} lacks {name}"
    policy = TorchPolicy(load_pretrained(last_dir), torch.device("cpu"))
    policy.setup_optimizer(OptimizerConfig(lr=SFT_LR, warmup_ratio=SFT_WARMUP_RATIO), total)
    state = policy.load(last_dir)
    assert state["step"] == last_step
    assert state["epoch"] == (last_step - 1) // STEPS_PER_EPOCH
    assert policy.optimizer is not None and policy.scheduler is not None
    assert len(policy.optimizer.state) > 0, "optimizer moments were not restored"
    assert policy.scheduler.last_epoch == last_step
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(last_dir), local_files_only=True).chat_template

    before = read_metrics(run_dir / "metrics.jsonl", raw=True)
    assert max(sft_steps(before)) >= last_step

    resumed = run_cli(*args, "resume=true")
    assert resumed.returncode == 0, tail(resumed.stderr)
    assert f"resuming SFT from {last_dir} (step {last_step} of {total})" in resumed.stderr

    after = read_metrics(run_dir / "metrics.jsonl", raw=True)
    new = after[len(before):]
    assert after[: len(before)] == before, "records written before the kill were altered"
    # Resumed right after the last checkpoint, not at step 1, and ran to the planned total.
    assert sft_steps(new) == list(range(last_step + 1, total + 1))
    # Readers see each step once: steps the killed run logged after its checkpoint are superseded.
    assert sft_steps(read_metrics(run_dir / "metrics.jsonl")) == list(range(1, total + 1))
    # The LR schedule continued where it left off: each step's logged lr is the one an
    # uninterrupted schedule (the package's own) gives at that step.
    expected = uninterrupted_lrs(OptimizerConfig(lr=SFT_LR, warmup_ratio=SFT_WARMUP_RATIO), total)
    for record in before + new:
        if record["stage"] == "sft":
            assert record["lr"] == pytest.approx(expected[record["step"] - 1], rel=1e-9, abs=1e-12), record

    final = run_dir / "sft" / "final"
    assert is_complete(final)
    assert (final / "model.safetensors").is_file()
    assert torch.load(final / "trainer_state.pt", weights_only=True)["extra"]["step"] == total


# -- CLI: resume=true after a finished recipe ------------------------------------------------------
@pytest.mark.slow
def test_resume_after_finished_recipe_skips_stages_and_reuses_eval(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["conf=recipe", *TINY, "sft.epochs=2", f"run.dir={run_dir}"]
    first = run_cli(*args)
    assert first.returncode == 0, tail(first.stderr)

    records = read_metrics(run_dir / "metrics.jsonl")
    stages = {r["stage"] for r in records}
    assert {"sft", "grpo", "eval/base@32", "eval/sft@32", "eval/grpo@32"} <= stages
    assert max(sft_steps(records)) == 2 * STEPS_PER_EPOCH
    eval_files = sorted((run_dir / "eval").glob("*.json"))
    assert [p.name for p in eval_files] == ["base@32.json", "grpo@32.json", "sft@32.json"]
    frozen = {name: digest_tree(run_dir / name) for name in ("base", "sft", "grpo", "eval")}
    report = json.loads((run_dir / "report.json").read_text())

    second = run_cli(*args, "resume=true")
    assert second.returncode == 0, tail(second.stderr)
    assert "SFT already finished" in second.stderr
    assert "GRPO already finished" in second.stderr

    # Nothing was trained or evaluated again: no new records at all ...
    assert read_metrics(run_dir / "metrics.jsonl") == records
    # ... and the models and cached evaluations are byte-for-byte (and mtime-for-mtime) untouched.
    for name, digests in frozen.items():
        assert digest_tree(run_dir / name) == digests, f"{name}/ changed on resume"
    # The report is rebuilt from the cached rows: same numbers.
    assert json.loads((run_dir / "report.json").read_text())["evaluations"] == report["evaluations"]
    for model in ("base", "sft", "grpo"):
        assert f"| {model} |" in second.stdout


# -- in-process: interrupted + resumed == uninterrupted ---------------------------------------------
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
MODEL_CFG = TinyModelConfig(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=128, max_position_embeddings=512)
SEED = 5


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def sft_task():
    # One thread: tiny tensors gain nothing from more, and a busy machine makes extra threads
    # spin (a 40x slowdown was seen with the default thread count next to another job).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train, _ = generate_splits(SyntheticTaskConfig(seed=3, n_train=24, n_eval=2, max_checks=2))
    tokenizer = train_tokenizer([f"{SYSTEM_PROMPT}\n{r.problem}\n{r.trace}" for r in train], vocab_size=300)
    yield tokenizer, tokenize_sft(train, tokenizer, SYSTEM_PROMPT, 512)
    torch.set_num_threads(threads)


def interrupt_after(policy: TorchPolicy, k: int) -> None:
    """Make ``policy.train_step`` raise ``Interrupted`` from its (k + 1)-th call on."""
    calls = {"n": 0}
    real_step = policy.train_step

    def train_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] > k:
            raise Interrupted
        return real_step(*a, **kw)

    policy.train_step = train_step  # type: ignore[method-assign]


def sft_cfg(packing: bool) -> SFTConfig:
    return SFTConfig(
        epochs=2, rows_per_step=4 if packing else 8, max_seq_len=512, packing=packing, save_every_steps=1,
        keep_last_checkpoints=2, optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.3, weight_decay=0.01),
    )


def train(stage_dir: Path, tokenizer, data, cfg: SFTConfig, *, stop_after: int | None = None,
          resume: bool = False) -> list[dict]:
    """One ``run_sft`` call on a fresh policy (same init seed); ``stop_after=k``: raise in step k+1.

    Steps are split into micro-batches of 4 rows, so gradient accumulation is exercised too."""
    torch.manual_seed(0)
    policy = TorchPolicy(build_tiny_model(MODEL_CFG, tokenizer, seed=11), torch.device("cpu"),
                         micro_batching=MicroBatching(rows=4))
    if stop_after is not None:
        interrupt_after(policy, stop_after)
    metrics_path = stage_dir / "metrics.jsonl"
    n_before = len(read_metrics(metrics_path)) if metrics_path.exists() else 0
    checkpoints = CheckpointManager(stage_dir, tokenizer, cfg.keep_last_checkpoints)
    with MetricsLogger(metrics_path) as metrics:
        if stop_after is None:
            run_sft(policy, data, cfg, checkpoints, metrics, seed=SEED, resume=resume)
        else:
            with pytest.raises(Interrupted):
                run_sft(policy, data, cfg, checkpoints, metrics, seed=SEED, resume=resume)
    return read_metrics(metrics_path)[n_before:]


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_resumed_sft_matches_uninterrupted_run(tmp_path: Path, sft_task, packing: bool) -> None:
    tokenizer, data = sft_task
    cfg = sft_cfg(packing)
    per_epoch = len(step_batches(data, cfg, SEED, 0))
    assert per_epoch >= 2, "the test needs a mid-epoch step"
    total = cfg.epochs * per_epoch

    reference = train(tmp_path / "reference", tokenizer, data, cfg)
    assert sft_steps(reference) == list(range(1, total + 1))
    ref_weights = load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))
    ref_loss = {r["step"]: r["loss"] for r in reference}

    # Interrupt mid-epoch (k = per_epoch + 1) and exactly at an epoch boundary (k = per_epoch).
    for k in (per_epoch + 1, per_epoch):
        stage = tmp_path / f"stop_{k}"
        first = train(stage, tokenizer, data, cfg, stop_after=k)
        assert sft_steps(first) == list(range(1, k + 1))
        assert [s for s, _ in list_checkpoints(stage / "checkpoints")][-1] == k
        assert not (stage / "final").exists()

        second = train(stage, tokenizer, data, cfg, resume=True)
        assert sft_steps(second) == list(range(k + 1, total + 1)), f"k={k}"
        for r in second:  # same batches, same optimizer state: same losses step by step
            assert r["loss"] == pytest.approx(ref_loss[r["step"]], abs=1e-6), f"k={k} step {r['step']}"
        weights = load_file(str(stage / "final" / "model.safetensors"))
        assert weights.keys() == ref_weights.keys()
        worst = max(float((weights[n] - ref_weights[n]).abs().max()) for n in ref_weights)
        assert worst <= 1e-6, f"k={k}: resumed final weights differ from the uninterrupted run by {worst}"


def test_resume_cleans_up_checkpoint_left_half_deleted_by_a_crash(tmp_path: Path, sft_task, monkeypatch) -> None:
    import shutil

    from fastmath_nemo.checkpoint import atomic

    tokenizer, data = sft_task
    cfg = sft_cfg(packing=False)  # 3 steps per epoch, 6 in all, keep_last_checkpoints=2
    stage = tmp_path / "sft"
    real_rmtree = shutil.rmtree

    def dies_while_deleting(path, *args, **kwargs):
        if Path(path).name.startswith(atomic.DELETE_PREFIX):
            raise Interrupted  # the process is killed right after the rename, before the delete
        return real_rmtree(path, *args, **kwargs)

    # The prune after step_3's save renames step_1 to .del-step_1-<pid> and "dies".
    monkeypatch.setattr(atomic.shutil, "rmtree", dies_while_deleting)
    policy = TorchPolicy(build_tiny_model(MODEL_CFG, tokenizer, seed=11), torch.device("cpu"),
                         micro_batching=MicroBatching(rows=4))
    with MetricsLogger(stage / "metrics.jsonl") as metrics, pytest.raises(Interrupted):
        run_sft(policy, data, cfg, CheckpointManager(stage, tokenizer, cfg.keep_last_checkpoints), metrics,
                seed=SEED)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(stage / "checkpoints")] == [2, 3]
    assert any(p.name.startswith(atomic.DELETE_PREFIX) for p in (stage / "checkpoints").iterdir())

    second = train(stage, tokenizer, data, cfg, resume=True)
    assert sft_steps(second) == [4, 5, 6]
    assert is_complete(stage / "final")
    assert [s for s, _ in list_checkpoints(stage / "checkpoints")] == [4, 5]
    leftovers = sorted(p.name for p in (stage / "checkpoints").iterdir() if p.name.startswith("."))
    assert leftovers == [], f"a finished, resumed run still holds the crashed run's debris: {leftovers}"


# -- in-process GRPO on the PyTorch backend: interrupted + resumed == uninterrupted ---------------------
def grpo_run(task, stage_dir: Path, *, stop_after: int | None = None, resume: bool = False) -> TorchPolicy:
    """Four GRPO steps (checkpoint at 2) of the tiny model sampling with its own TorchGenerator
    (a separate copy of the weights, so only a refit brings it up to date), KL to the initial
    weights. Rewards: cosine over character lengths, which vary between sampled completions, so
    advantages are never all 0. ``stop_after=k``: raise in step k + 1."""
    from fastmath_nemo.config.schema import RewardSpec
    from fastmath_nemo.generation.torch_generator import TorchGenerator
    from tests.algorithms._scripted import grpo_config, run

    cfg = grpo_config(steps=4, save_every_steps=2, beta=0.1, length_unit="chars",
                      rewards=[RewardSpec("cosine", 1.0, {"max_len": 400})])
    policy = TorchPolicy(task.varied_model(seed=3, std=0.1), torch.device("cpu"))
    policy.snapshot_reference()  # the stage's initial weights, before any resume loads a checkpoint
    generator = TorchGenerator(task.varied_model(seed=3, std=0.1), task.pad_id)
    if stop_after is not None:
        interrupt_after(policy, stop_after)
        with pytest.raises(Interrupted):
            run(policy, task.tokenizer, cfg, stage_dir, generator)
    else:
        run(policy, task.tokenizer, cfg, stage_dir, generator, resume=resume)
    return policy


def test_resumed_grpo_matches_uninterrupted_run_and_logs_each_step_once(tmp_path: Path, tiny_task) -> None:
    reference = grpo_run(tiny_task, tmp_path / "reference")
    expected = {r["step"]: r for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")}
    assert sorted(expected) == [1, 2, 3, 4]
    assert all(r["reward/std"] > 0 and r["kl"] >= 0 for r in expected.values())

    # Killed in step 4: step 3 was logged after the last checkpoint (step 2) and is trained again.
    stage = tmp_path / "killed"
    grpo_run(tiny_task, stage, stop_after=3)
    assert [s for s, _ in list_checkpoints(stage / "checkpoints")] == [2]
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3]
    resumed = grpo_run(tiny_task, stage, resume=True)

    raw = read_metrics(stage / "metrics.jsonl", raw=True)
    assert [(r["stage"], r["step"]) for r in raw] == [("grpo", 1), ("grpo", 2), ("grpo", 3), ("resume", 2),
                                                      ("grpo", 3), ("grpo", 4)]
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # each step once, 3 from the resumed run
    assert records[2]["time"] == raw[4]["time"]
    for r in records:  # the sampler was refit from the checkpoint, the KL reference is the initial policy
        for key in ("reward/mean", "completion/mean_tokens", "loss", "kl", "grad_norm"):
            assert r[key] == pytest.approx(expected[r["step"]][key], rel=1e-5, abs=1e-6), (key, r["step"])
    ours = dict(resumed.model.named_parameters())
    worst = max(float((ours[n] - p).detach().abs().max()) for n, p in reference.model.named_parameters())
    assert worst <= 1e-6, f"resumed GRPO weights differ from the uninterrupted run's by {worst}"
