"""Hand-derived checks of the SFT/GRPO losses; every expected number is worked out in a comment."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch

from fastmath_nemo.algorithms.losses import (
    GRPOLossConfig,
    aggregate_loss,
    grpo_loss,
    kl_k3,
    masked_mean,
    masked_sum,
    sft_loss,
)
from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.step_totals import StepTotals

E = math.e


def make_batch(mask: list[list[float]], **fields: torch.Tensor | None) -> Batch:
    loss_mask = torch.tensor(mask, dtype=torch.float32)
    rows, width = loss_mask.shape
    ids = torch.zeros(rows, width, dtype=torch.long)
    return Batch(ids, ids.clone(), torch.ones_like(ids), loss_mask, **fields)


def one_token(
    log_ratio: float,
    adv: float,
    cfg: GRPOLossConfig,
    **fields: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """A 1x2 batch whose only target is t = 1 with lp - old_lp = log_ratio; returns grad too."""
    lp = torch.tensor([[0.0, log_ratio]], requires_grad=True)
    batch = make_batch(
        [[0.0, 1.0]],
        advantages=torch.tensor([adv]),
        old_logprobs=torch.zeros(1, 2),
        **fields,
    )
    loss, metrics = grpo_loss(lp, batch, cfg)
    loss.backward()
    assert lp.grad is not None
    return loss, metrics, lp.grad


NO_KL = GRPOLossConfig(beta=0.0)


# ----------------------------------------------------------------------------- helpers


def test_masked_helpers_ignore_non_finite_outside_mask() -> None:
    x = torch.tensor([[1.0, 2.0, float("-inf")], [4.0, float("nan"), 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert masked_sum(x, m).item() == 13.0
    assert masked_mean(x, m).item() == pytest.approx(13.0 / 4)
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 5.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


# ----------------------------------------------------------------------------- aggregation

# per-token loss [[1, 2, 3], [4, 5, 6]] with mask [[1, 1, 0], [1, 0, 0]]:
#   token-mean              = (1 + 2 + 4) / 3          = 2.333333
#   seq-mean-token-mean     = ((1 + 2) / 2 + 4 / 1) / 2 = (1.5 + 4) / 2 = 2.75
#   seq-mean-token-sum-norm = (3 + 4) / (B=2 * T=3)    = 7 / 6 = 1.166667
#                     norm_length = 4: 7 / (2 * 4)     = 0.875
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "norm_length", "want"),
    [
        ("token-mean", None, 7.0 / 3.0),
        ("seq-mean-token-mean", None, 2.75),
        ("seq-mean-token-sum-norm", None, 7.0 / 6.0),
        ("seq-mean-token-sum-norm", 4, 0.875),
    ],
)
def test_aggregate_modes(mode: str, norm_length: int | None, want: float) -> None:
    got = aggregate_loss(LOSS, MASK, mode, norm_length)  # type: ignore[arg-type]
    assert got.shape == ()
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_seq_mean_skips_rows_without_targets() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # Only row 0 counts: (1 + 2) / 2 = 1.5 (not 1.5 / 2).
    assert aggregate_loss(LOSS, mask, "seq-mean-token-mean").item() == pytest.approx(1.5)


# The same two rows as two micro-batches (row 0 alone, row 1 trimmed to width 1) with the
# step's totals N = 3 tokens, S = 2 sequences, R = 2 rows, W = 3:
#   token-mean              shares (1 + 2) / 3 = 1      and 4 / 3 = 1.333333  -> 2.333333
#   seq-mean-token-mean     shares 1.5 / 2 = 0.75       and 4 / 2 = 2         -> 2.75
#   seq-mean-token-sum-norm shares 3 / (2 * 3) = 0.5    and 4 / 6 = 0.666667  -> 1.166667
# Local means would give 1.5 + 4 (token-mean), and Dr.GRPO's B = 1, T = 1 for row 1 alone: 3/3 + 4/1.
STEP = StepTotals(target_tokens=3, sequences=2, rows=2, longest=3)


@pytest.mark.parametrize(
    ("mode", "shares"),
    [("token-mean", (1.0, 4.0 / 3.0)), ("seq-mean-token-mean", (0.75, 2.0)), ("seq-mean-token-sum-norm", (0.5, 4.0 / 6.0))],
)
def test_micro_batch_shares_sum_to_the_full_batch(mode: str, shares: tuple[float, float]) -> None:
    parts = (aggregate_loss(LOSS[:1], MASK[:1], mode, None, STEP),  # type: ignore[arg-type]
             aggregate_loss(LOSS[1:, :1], MASK[1:, :1], mode, None, STEP))  # type: ignore[arg-type]
    assert [p.item() for p in parts] == pytest.approx(list(shares), abs=1e-6)
    full = aggregate_loss(LOSS, MASK, mode)  # type: ignore[arg-type]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-6)


def test_grpo_metrics_are_shares_of_the_step() -> None:
    """Two one-token micro-batches with ratios e and 1 (advantage 1, no KL): the clipped one
    counts once in clip_fraction over N = 2 step tokens, so the shares are 1/2 and 0;
    ratio_mean shares are e/2 and 1/2 (mean (e + 1) / 2), ratio_max stays a per-batch max."""
    totals = StepTotals(target_tokens=2, sequences=2, rows=2, longest=2)
    metrics = []
    for log_ratio in (1.0, 0.0):
        lp = torch.tensor([[0.0, log_ratio]])
        batch = make_batch([[0.0, 1.0]], advantages=torch.tensor([1.0]), old_logprobs=torch.zeros(1, 2))
        metrics.append(grpo_loss(lp, batch, NO_KL, totals)[1])
    assert [m["clip_fraction"].item() for m in metrics] == pytest.approx([0.5, 0.0])
    assert [m["ratio_mean"].item() for m in metrics] == pytest.approx([E / 2, 0.5])
    assert [m["ratio_max"].item() for m in metrics] == pytest.approx([E, 1.0])
    # token-mean pg: -min(e, 1.2) / 2 = -0.6 and -1 / 2 = -0.5
    assert [m["loss"].item() for m in metrics] == pytest.approx([-0.6, -0.5])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_mask_gives_zero(mode: str) -> None:
    empty = torch.zeros_like(MASK)
    assert aggregate_loss(LOSS, empty, mode).item() == 0.0  # type: ignore[arg-type]


def test_aggregate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(LOSS, MASK, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ"):
        aggregate_loss(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match="norm_length"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", 0)


# ----------------------------------------------------------------------------- SFT

# logprobs [[0, -1, -2], [0, -3, -inf]] with mask [[0, 1, 1], [0, 1, 0]]:
# NLL of targets = 1 + 2 + 3 = 6 over 3 tokens -> 2.0; with a global count of 4 -> 1.5.
# The -inf sits on a non-target (padding) and must not leak into loss or gradient.
SFT_LP = [[0.0, -1.0, -2.0], [0.0, -3.0, float("-inf")]]
SFT_MASK = [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]


def test_sft_local_mean_and_gradient() -> None:
    lp = torch.tensor(SFT_LP, requires_grad=True)
    loss, metrics = sft_loss(lp, make_batch(SFT_MASK))
    assert loss.item() == pytest.approx(2.0)
    assert metrics["loss"].item() == pytest.approx(2.0)
    assert metrics["num_tokens"].item() == 3.0
    assert not metrics["loss"].requires_grad
    loss.backward()
    # d/dlp of -sum(m lp) / 3 = -m / 3.
    torch.testing.assert_close(lp.grad, -torch.tensor(SFT_MASK) / 3.0)


def test_sft_global_normaliser() -> None:
    lp = torch.tensor(SFT_LP)
    loss, metrics = sft_loss(lp, make_batch(SFT_MASK), StepTotals(target_tokens=4, sequences=2, rows=2, longest=3))
    assert loss.item() == pytest.approx(1.5)
    assert metrics["num_tokens"].item() == 3.0
    # a step without any target gives 0, not NaN (the denominator is clamped to 1)
    empty, _ = sft_loss(lp, make_batch([[0.0] * 3] * 2), StepTotals(0, 0, 2, 3))
    assert empty.item() == 0.0


def test_sft_micro_batches_sum_to_full_batch_mean() -> None:
    lp = torch.tensor(SFT_LP)
    batch = make_batch(SFT_MASK)
    full, _ = sft_loss(lp, batch)
    total = batch.loss_mask.sum().item()  # 3 tokens in the whole window
    # Row 0 contributes (1 + 2) / 3 = 1, row 1 contributes 3 / 3 = 1; sum = 2 = full mean.
    totals = StepTotals(target_tokens=total, sequences=2, rows=2, longest=3)
    parts = [sft_loss(lp[i : i + 1], batch.select(slice(i, i + 1)), totals)[0] for i in range(2)]
    assert [p.item() for p in parts] == pytest.approx([1.0, 1.0])
    assert sum(p.item() for p in parts) == pytest.approx(full.item())
    # A local mean per micro-batch would give (1.5 + 3) / 2 = 2.25, the bias this avoids.
    local = [sft_loss(lp[i : i + 1], batch.select(slice(i, i + 1)))[0].item() for i in range(2)]
    assert sum(local) / 2 == pytest.approx(2.25)


def test_sft_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="loss_mask"):
        sft_loss(torch.zeros(2, 2), make_batch(SFT_MASK))


# ----------------------------------------------------------------------------- k3 KL


def test_kl_k3_values() -> None:
    lp = torch.tensor([[0.0, 0.0, 0.3]])
    ref = torch.tensor([[0.5, -1.0, 0.3]])
    # d = 0.5: e^0.5 - 0.5 - 1 = 0.1487213;  d = -1: e^-1 + 1 - 1 = 0.3678794;  d = 0: 0.
    want = torch.tensor([[math.exp(0.5) - 1.5, math.exp(-1.0), 0.0]])
    torch.testing.assert_close(kl_k3(lp, ref), want)
    assert kl_k3(lp, ref)[0, 0].item() == pytest.approx(0.148721, abs=1e-6)


def test_kl_k3_is_clamped_like_verl_low_var_kl() -> None:
    # d = ref - lp = 100 (a token the reference finds e^100 times likelier): e^100 is inf in
    # fp32, so unclamped the loss was inf. d is clamped to 20, e^20 - 21 = 4.85e8, then k3 to 10.
    # d = -30: clamped to -20, e^-20 + 20 - 1 = 19.0000, then 10. d = 3: e^3 - 4 = 16.0855 -> 10.
    # d = 2.0: e^2 - 3 = 4.3890561, under both bounds, unchanged.
    lp = torch.zeros(1, 4)
    ref = torch.tensor([[100.0, -30.0, 3.0, 2.0]])
    torch.testing.assert_close(kl_k3(lp, ref), torch.tensor([[10.0, 10.0, 10.0, math.exp(2.0) - 3.0]]))
    # In the loss: r = 1, A = 1, beta = 0.1: loss = -1 + 0.1 * 10 = 0, finite; the clamped KL
    # passes no gradient, so dL/dlp = -A r = -1 (the policy-gradient term only).
    loss, m, grad = one_token(0.0, 1.0, GRPOLossConfig(beta=0.1), ref_logprobs=torch.tensor([[0.0, 100.0]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert m["kl"].item() == pytest.approx(10.0)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.0]]))


# ----------------------------------------------------------------------------- GRPO clipping


def test_positive_advantage_ratio_e_is_clipped() -> None:
    # r = e, A = 1: min(e * 1, clip(e, 0.8, 1.2) * 1) = 1.2 -> loss -1.2; clipped, so no gradient.
    loss, m, grad = one_token(1.0, 1.0, NO_KL)
    assert loss.item() == pytest.approx(-1.2)
    assert m["clip_fraction"].item() == 1.0
    assert m["ratio_mean"].item() == pytest.approx(E)
    assert m["ratio_max"].item() == pytest.approx(E)
    torch.testing.assert_close(grad, torch.zeros(1, 2))


def test_negative_advantage_ratio_inv_e_is_clipped() -> None:
    # r = e^-1 = 0.3679, A = -1: min(-0.3679, clip(0.3679, 0.8, 1.2) * -1 = -0.8) = -0.8
    # -> loss 0.8; the clipped term is selected, so no gradient.
    loss, m, grad = one_token(-1.0, -1.0, NO_KL)
    assert loss.item() == pytest.approx(0.8)
    assert m["clip_fraction"].item() == 1.0
    torch.testing.assert_close(grad, torch.zeros(1, 2))


def test_negative_advantage_ratio_e_is_not_clipped() -> None:
    # r = e, A = -1: min(-e, -1.2) = -e -> loss e (pessimistic bound keeps the large ratio).
    # dL/dlp = -A * r = e.
    loss, m, grad = one_token(1.0, -1.0, NO_KL)
    assert loss.item() == pytest.approx(E)
    assert m["clip_fraction"].item() == 0.0
    torch.testing.assert_close(grad, torch.tensor([[0.0, E]]))


def test_positive_advantage_ratio_inv_e_is_not_clipped() -> None:
    # r = e^-1, A = 1: min(0.3679, 0.8) = 0.3679 -> loss -0.3679; dL/dlp = -r = -0.3679.
    loss, m, grad = one_token(-1.0, 1.0, NO_KL)
    assert loss.item() == pytest.approx(-1.0 / E)
    assert m["clip_fraction"].item() == 0.0
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.0 / E]]))


def test_clip_higher_is_asymmetric() -> None:
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.0)
    # r = 1.5, A = 1: clipped at 1 + 0.28 -> loss -1.28 (symmetric eps would give -1.2).
    assert one_token(math.log(1.5), 1.0, cfg)[0].item() == pytest.approx(-1.28)
    # r = 1.25, A = 1: inside [0.8, 1.28] -> loss -1.25, not clipped (symmetric would clip).
    loss, m, _ = one_token(math.log(1.25), 1.0, cfg)
    assert loss.item() == pytest.approx(-1.25)
    assert m["clip_fraction"].item() == 0.0
    # r = 0.5, A = -1: lower bound still 1 - 0.2 -> min(-0.5, -0.8) = -0.8 -> loss 0.8.
    assert one_token(math.log(0.5), -1.0, cfg)[0].item() == pytest.approx(0.8)


def test_mixed_batch_clip_fraction_and_ratio_stats() -> None:
    # Row 0 (A = 1):  t0 masked (r = e^5 would clip), t1 r = 1.5 -> -1.2 (clipped),
    #                 t2 r = 1.1 -> -1.1.
    # Row 1 (A = -1): t0 masked, t1 r = 0.5 -> 0.8 (clipped), t2 r = 2 -> min(-2, -1.2) -> 2.
    # token-mean = (-1.2 - 1.1 + 0.8 + 2) / 4 = 0.125; clip_fraction = 2 / 4 = 0.5;
    # ratio_mean = (1.5 + 1.1 + 0.5 + 2) / 4 = 1.275; ratio_max = 2 (e^5 is not a target).
    lp = torch.log(torch.tensor([[math.exp(5.0), 1.5, 1.1], [1.0, 0.5, 2.0]]))
    batch = make_batch(
        [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]],
        advantages=torch.tensor([1.0, -1.0]),
        old_logprobs=torch.zeros(2, 3),
    )
    loss, m = grpo_loss(lp, batch, NO_KL)
    assert loss.item() == pytest.approx(0.125, abs=1e-6)
    assert m["pg_loss"].item() == pytest.approx(0.125, abs=1e-6)
    assert m["kl"].item() == 0.0
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx(1.275, abs=1e-6)
    assert m["ratio_max"].item() == pytest.approx(2.0)
    assert "tis_weight_mean" not in m
    # seq-mean-token-mean: ((-1.2 - 1.1) / 2 + (0.8 + 2) / 2) / 2 = (-1.15 + 1.4) / 2 = 0.125
    # (equal lengths); Dr.GRPO with norm_length 4: 0.5 / (2 * 4) = 0.0625.
    dr = GRPOLossConfig(beta=0.0, loss_agg="seq-mean-token-sum-norm", norm_length=4)
    assert grpo_loss(lp, batch, dr)[0].item() == pytest.approx(0.0625, abs=1e-6)


# ----------------------------------------------------------------------------- gradients, KL


def test_gradient_unclipped_token_with_kl() -> None:
    # One target, r = 1.1 (unclipped for A = 2 > 0 since 1.1 < 1.2), beta = 0.1, ref - lp = 0.5.
    # loss = -A r + beta k3 = -2.2 + 0.1 (e^0.5 - 1.5) = -2.2 + 0.0148721 = -2.1851279
    # dL/dlp = -A r + beta (1 - e^(ref - lp)) = -2.2 + 0.1 (1 - 1.6487213) = -2.2648721
    log_r = math.log(1.1)
    cfg = GRPOLossConfig(beta=0.1)
    ref = torch.tensor([[0.0, log_r + 0.5]])
    loss, m, grad = one_token(log_r, 2.0, cfg, ref_logprobs=ref)
    assert loss.item() == pytest.approx(-2.1851279, abs=1e-6)
    assert m["pg_loss"].item() == pytest.approx(-2.2, abs=1e-6)
    assert m["kl"].item() == pytest.approx(0.1487213, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -2.2648721]]))


def test_on_policy_gradient_is_minus_advantage_over_tokens() -> None:
    # old_logprobs None -> r = 1 everywhere; loss = token-mean of -A = -(1 + 1 - 2) / 3 = 0
    # but the gradient is -A / 3 per target: row 0 -> -1/3, row 1 -> +2/3.
    lp = torch.tensor([[0.0, -0.7, -1.3], [0.0, -0.2, float("-inf")]], requires_grad=True)
    batch = make_batch([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]], advantages=torch.tensor([1.0, -2.0]))
    loss, m = grpo_loss(lp, batch, NO_KL)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1 / 3, -1 / 3], [0.0, 2 / 3, 0.0]]))


def test_beta_without_reference_raises() -> None:
    lp = torch.zeros(1, 2)
    batch = make_batch([[0.0, 1.0]], advantages=torch.ones(1))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, batch, GRPOLossConfig(beta=0.04))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, make_batch([[0.0, 1.0]]), NO_KL)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, make_batch([[0.0, 1.0]], advantages=torch.ones(2)), NO_KL)


# ----------------------------------------------------------------------------- TIS


def test_truncated_importance_sampling_weight() -> None:
    # r = 1, A = 1 -> unweighted pg = -1. old - rollout = log 3 -> w = min(3, cap).
    rollout = torch.tensor([[0.0, -math.log(3.0)]])
    capped = GRPOLossConfig(beta=0.0, tis_cap=2.0)
    loss, m, grad = one_token(0.0, 1.0, capped, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-2.0)  # w capped at 2
    assert m["tis_weight_mean"].item() == pytest.approx(2.0)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -2.0]]))  # -A r w
    loose = GRPOLossConfig(beta=0.0, tis_cap=5.0)
    loss, m, _ = one_token(0.0, 1.0, loose, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-3.0)  # under the cap: w = 3
    # TIS off (default) ignores rollout_logprobs; cap set without rollout_logprobs is a no-op.
    loss, m, _ = one_token(0.0, 1.0, NO_KL, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-1.0)
    assert "tis_weight_mean" not in m
    loss, m, _ = one_token(0.0, 1.0, capped)
    assert loss.item() == pytest.approx(-1.0)
    assert "tis_weight_mean" not in m


# ----------------------------------------------------------------------------- config, API


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps_low": 1.0},
        {"eps_high": -0.1},
        {"beta": -1.0},
        {"loss_agg": "sum"},
        {"norm_length": 0},
        {"tis_cap": 0.0},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GRPOLossConfig(**kwargs)  # type: ignore[arg-type]


def test_partial_is_a_loss_fn_and_metrics_are_detached() -> None:
    loss_fn = functools.partial(grpo_loss, cfg=GRPOLossConfig(beta=0.04))
    lp = torch.tensor([[0.0, -0.5, -1.0]], requires_grad=True)
    batch = make_batch(
        [[0.0, 1.0, 1.0]],
        advantages=torch.tensor([0.5]),
        old_logprobs=torch.tensor([[0.0, -0.6, -1.0]]),
        ref_logprobs=torch.tensor([[0.0, -0.4, -1.2]]),
    )
    loss, metrics = loss_fn(lp, batch)
    assert loss.requires_grad and loss.shape == ()
    assert set(metrics) == {"loss", "pg_loss", "kl", "clip_fraction", "ratio_mean", "ratio_max"}
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())


def test_bf16_logprobs_are_computed_in_float32() -> None:
    lp = torch.tensor([[0.0, -1.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = sft_loss(lp, make_batch([[0.0, 1.0]]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad is not None and lp.grad.dtype == torch.bfloat16


def test_algorithms_import_no_heavy_backends() -> None:
    code = (
        "import sys, fastmath_nemo.algorithms.losses, fastmath_nemo.algorithms.advantages\n"
        "bad = [m for m in ('megatron', 'transformer_engine', 'vllm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    # Pass our sys.path on so the child finds the package wherever pytest was started.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
