"""run_grpo in every mode, with a scripted generator (no sampling) and the tiny model.

Two problems with the same answer, each with one right and one wrong scripted completion, so
every group's rewards are (1, 0) and its advantages are +-a with a = 0.5 / (std + 1e-6),
std = sqrt(0.5) (GRPO) or a = 0.5 (Dr.GRPO). At the first step the policy is the rollout's and
the reference's, so ratio = 1 and KL = 0 and the loss has a closed form in the completions'
token counts n_right, n_wrong. Every step is then replayed on a control policy (same initial
weights) from the recorded rows with a hand-written GRPOLossConfig: the logged losses, KL,
ratios, gradient norms and the final weights must be the control's.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss
from fastmath_nemo.batching.step_totals import StepTotals
from fastmath_nemo.algorithms.grpo import rollout_metrics, score_rollouts
from fastmath_nemo.config.schema import GRPOConfig
from fastmath_nemo.generation.base import SamplingParams
from fastmath_nemo.policy.torch_policy import TorchPolicy
from tests.algorithms._scripted import GEN, ScriptedGenerator, grpo_config, run, scripted_completions

CPU = torch.device("cpu")
GRPO_A = 0.5 / (math.sqrt(0.5) + 1e-6)  # (1 - 0.5) / (unbiased std of (1, 0) + eps)


def torch_policy(task) -> TorchPolicy:
    return TorchPolicy(task.varied_model(seed=3, std=0.1), CPU, temperature=1.0)


def recording(policy) -> list[list]:
    """Wrap ``policy.train_step`` to record each call's micro-batches; returns the record."""
    calls: list[list] = []
    real = policy.train_step

    def train_step(micro, loss_fn):
        calls.append(list(micro))
        return real(micro, loss_fn)

    policy.train_step = train_step
    return calls


def replay(task, cfg: GRPOConfig, calls: list[list]) -> tuple[list[dict], TorchPolicy]:
    """The steps of ``calls`` on a fresh control policy: old and reference logprobs computed
    here, the loss configured by hand. Returns the metrics of each step's last update."""
    control = torch_policy(task)
    control.setup_optimizer(cfg.optimizer, cfg.steps * cfg.updates_per_batch)
    if cfg.beta > 0:
        control.snapshot_reference()
    loss_cfg = GRPOLossConfig(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, loss_agg=cfg.loss_agg,
                              norm_length=GEN.max_tokens, tis_cap=cfg.tis_cap)
    out = []
    for step in range(cfg.steps):
        (batch,) = calls[step * cfg.updates_per_batch]
        batch = batch.with_fields(old_logprobs=control.logprobs(batch),
                                  ref_logprobs=control.reference_logprobs(batch) if cfg.beta > 0 else None)
        loss_fn = functools.partial(grpo_loss, cfg=loss_cfg, totals=StepTotals.of(batch.loss_mask))
        for _ in range(cfg.updates_per_batch):
            metrics = control.train_step([batch], loss_fn)
        out.append(metrics)
    return out, control


def first_step_loss(cfg: GRPOConfig, n_right: int, n_wrong: int, a: float, tis: float = 1.0) -> float:
    """The step-1 loss by hand (ratio 1, KL 0): per token -A (times the TIS weight), aggregated."""
    if cfg.loss_agg == "token-mean":  # sum(-A n) / sum(n) over 2 groups
        return -tis * a * (n_right - n_wrong) / (n_right + n_wrong)
    if cfg.loss_agg == "seq-mean-token-mean":  # every sequence's mean is -A: they cancel
        return 0.0
    return -tis * a * 2 * (n_right - n_wrong) / (4 * GEN.max_tokens)  # 4 rows x max_tokens


MODES = {
    "grpo-token-mean": (dict(), GRPO_A),
    "seq-mean-token-mean": (dict(loss_agg="seq-mean-token-mean"), GRPO_A),
    "seq-mean-token-sum-norm": (dict(loss_agg="seq-mean-token-sum-norm"), GRPO_A),
    "dr-grpo": (dict(scale_rewards=False, loss_agg="seq-mean-token-sum-norm"), 0.5),
    "tis": (dict(tis_cap=2.0), GRPO_A),
    "kl": (dict(beta=0.5), GRPO_A),
    "two-updates": (dict(updates_per_batch=2), GRPO_A),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_grpo_loop_matches_the_hand_computation(tiny_task, tmp_path: Path, mode: str) -> None:
    overrides, a = MODES[mode]
    cfg = grpo_config(**overrides)
    # TIS: a rollout logprob far below the trainer's makes every weight exp(old - rollout) hit the cap.
    completions = scripted_completions(tiny_task.tokenizer, rollout_logprob=-50.0 if cfg.tis_cap else -1.0)
    n_right, n_wrong = (len(ids) for ids, _, _ in completions)
    assert n_right > n_wrong
    policy = torch_policy(tiny_task)
    if cfg.beta > 0:
        policy.snapshot_reference()
    calls = recording(policy)
    generator = ScriptedGenerator(completions)
    records = run(policy, tiny_task.tokenizer, cfg, tmp_path, generator)

    assert [r["step"] for r in records] == [1, 2]
    assert len(calls) == cfg.steps * cfg.updates_per_batch
    assert generator.refits == cfg.steps  # refit after every step, from the updated weights
    for (batch,) in calls:  # group-major rows: (right, wrong) per prompt
        assert batch.advantages.tolist() == pytest.approx([a, -a, a, -a], abs=1e-6)
        assert batch.loss_mask.sum(dim=1).tolist() == [n_right, n_wrong, n_right, n_wrong]
    first, second = records
    assert first["reward/mean"] == 0.5 and first["accuracy"] == 0.5
    assert first["completion/mean_tokens"] == (n_right + n_wrong) / 2
    tis = cfg.tis_cap or 1.0
    if cfg.updates_per_batch == 1:
        assert first["loss"] == pytest.approx(first_step_loss(cfg, n_right, n_wrong, a, tis), abs=1e-6)
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    else:  # the second update's ratio is against the rollout-time (old) logprobs, not 1
        assert abs(first["ratio_mean"] - 1.0) > 1e-3
    if cfg.tis_cap:
        assert first["tis_weight_mean"] == pytest.approx(cfg.tis_cap)
    if cfg.beta > 0:  # the reference is the initial policy: no KL before the first update, some after
        assert first["kl"] == pytest.approx(0.0, abs=1e-7)
        assert second["kl"] > 1e-4
        assert second["loss"] - second["pg_loss"] == pytest.approx(cfg.beta * second["kl"], rel=1e-4)

    expected, control = replay(tiny_task, cfg, calls)
    for record, theirs in zip(records, expected):
        for key in ("loss", "pg_loss", "kl", "ratio_mean", "ratio_max", "clip_fraction", "grad_norm", "lr"):
            assert record[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, record["step"])
    ours = dict(policy.model.named_parameters())
    for name, param in control.model.named_parameters():
        assert torch.allclose(ours[name], param, atol=1e-6), name
    assert any(not torch.equal(p, q) for p, q in zip(tiny_task.varied_model(seed=3, std=0.1).parameters(),
                                                     policy.model.parameters()))


def _rows(scored, rollouts) -> list:
    """The rows a rank contributes to the gather in rollout_metrics."""
    captured: list = []
    rollout_metrics(scored, rollouts, gather=lambda rows: captured.extend(rows) or rows)
    return captured


def test_rollout_metrics_describe_every_data_parallel_rank(tiny_task) -> None:
    """Rank 0 logs the whole step: with another rank's rows (an injected gather, as
    all_gather_objects over two ranks) accuracy, reward and lengths are those of all rows."""
    tokenizer = tiny_task.tokenizer
    right, wrong = scripted_completions(tokenizer)
    prompts, golds, params = [[1], [2]], ["7", "7"], SamplingParams(n=2)
    here = ScriptedGenerator([right, right]).generate(prompts, params)  # all right on this rank
    there = ScriptedGenerator([wrong, wrong]).generate(prompts, params)  # all wrong, all cut, on the other
    there.finish_reasons = ["length"] * 4
    cfg = grpo_config()
    local, remote = (score_rollouts(r, prompts, golds, tokenizer, cfg) for r in (here, there))

    alone = rollout_metrics(local, here, gather=lambda rows: rows)
    assert (alone["accuracy"], alone["reward/mean"], alone["completion/truncated_share"]) == (1.0, 1.0, 0.0)
    step = rollout_metrics(local, here, gather=lambda rows: rows + _rows(remote, there))
    n_right, n_wrong = len(right[0]), len(wrong[0])
    assert step["accuracy"] == 0.5 and step["reward/mean"] == 0.5 and step["reward/accuracy"] == 0.5
    assert step["reward/std"] == pytest.approx(math.sqrt(8 * 0.25 / 7))  # unbiased: four 1s, four 0s
    assert step["completion/mean_tokens"] == (n_right + n_wrong) / 2
    assert (step["completion/min_tokens"], step["completion/max_tokens"]) == (n_wrong, n_right)
    assert step["completion/truncated_share"] == 0.5


def test_logprob_mismatch_describes_every_data_parallel_rank() -> None:
    """Rank 0's mismatch metric is over all ranks' tokens: two ranks' halves of a batch, joined by
    an injected reduce (as all_reduce_data_parallel), give the whole batch's max and mean."""
    from fastmath_nemo.algorithms.grpo import logprob_mismatch
    from fastmath_nemo.batching.batch import batch_from_sequences

    seqs = [[5, 6, 7, 8], [5, 6, 9], [5, 7, 7, 7], [5, 8]]
    batch = batch_from_sequences(seqs, [[0, 1, 1, 1], [0, 1, 1], [0, 0, 1, 1], [0, 1]], pad_id=0)
    rollout = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -1.0, -1.0, 0.0],
                            [0.0, 0.0, -1.0, -1.0], [0.0, -2.0, 0.0, 0.0]])
    batch = batch.with_fields(rollout_logprobs=rollout)
    trainer = rollout + torch.tensor([[9.0, 0.1, 0.2, 0.3], [9.0, 0.0, 0.1, 9.0],
                                      [9.0, 9.0, 0.5, 0.1], [9.0, 0.4, 9.0, 9.0]])  # 9: not a target
    whole = logprob_mismatch(trainer, batch, reduce=lambda t, op: t)
    # diffs on targets: 0.1 0.2 0.3 | 0.0 0.1 | 0.5 0.1 | 0.4 -> max 0.5, mean 1.7 / 8
    assert whole["rollout/logprob_diff_max"] == pytest.approx(0.5)
    assert whole["rollout/logprob_diff_mean"] == pytest.approx(1.7 / 8)

    halves = [slice(0, 2), slice(2, 4)]
    sent: dict[str, torch.Tensor] = {}  # what rank 1 contributes to each reduction

    def capture(tensor, op):
        sent[op] = tensor
        return tensor

    logprob_mismatch(trainer[halves[1]], batch.select(halves[1]), reduce=capture)
    rank0 = logprob_mismatch(trainer[halves[0]], batch.select(halves[0]),
                             reduce=lambda t, op: t + sent[op] if op == "sum" else torch.maximum(t, sent[op]))
    alone = logprob_mismatch(trainer[halves[0]], batch.select(halves[0]), reduce=lambda t, op: t)
    assert alone["rollout/logprob_diff_max"] == pytest.approx(0.3)  # rank 0's share differs ...
    assert rank0 == pytest.approx(whole)  # ... the reduced one is the whole step's
