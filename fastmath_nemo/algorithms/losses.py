"""SFT and GRPO losses as pure tensor functions (no model, no distributed code).

Shapes: ``B`` rows, ``T`` tokens per row. ``logprobs[b, t] = log p(input_ids[b, t] | prefix)``
and ``loss_mask[b, t] = 1`` on target tokens (see :mod:`fastmath_nemo.batching.batch`).

Every loss has the :data:`fastmath_nemo.policy.base.LossFn` shape
``(logprobs[B, T], batch) -> (scalar loss, metrics)``; bind extra arguments with
``functools.partial``, e.g. ``functools.partial(grpo_loss, cfg=cfg)``. Metrics are detached
0-d tensors. Computation runs in float32 whatever the input dtype (bf16 logprobs would
lose the small differences that ratios and KL depend on); gradients flow back in the
input dtype.

Tokens outside the mask never contribute, even when their values are ``-inf``/NaN (e.g. a
padding logprob): they are replaced with 0 *before* any ``exp``, so neither the forward
value nor the backward pass can see them.

**The step contract** (how micro-batches and data-parallel ranks add up). An optimizer step
is ``M_r`` micro-batches on each data-parallel rank ``r``. The training loop computes the
step's :class:`StepTotals` over all of them (``batching.step_totals.step_totals``, a collective) and
binds them, e.g. ``functools.partial(grpo_loss, cfg=cfg, totals=totals)``. Every loss is then
its micro-batch's *share*: a sum over the micro-batch's tokens (or sequences) divided by a
step total, so that

    sum over ranks r, micro-batches i of loss(r, i) = the loss of all the step's rows as one batch,

exactly, whatever the split. Policies therefore SUM micro-batch losses (their gradients)
over micro-batches and data-parallel ranks, cancelling the averaging that DDP (over ranks)
and megatron (over ranks and micro-batches) would apply. Metrics obey the same rule: each
is a share of the step's value, summed the same way, except keys ending in ``_max``, which
are maxima (``batching.step_totals.reduce_step_metrics``). Without totals a loss normalises over
its own micro-batch (``StepTotals.of`` its mask): that is the step's loss only when the step
is one micro-batch on one rank (direct calls, unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.step_totals import StepTotals
from fastmath_nemo.config.schema import LossAggregation


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask)`` over ``dim`` (all dims when None).

    ``x`` and ``mask`` have the same shape, e.g. ``[B, T]``; the result is 0-d, or ``x``
    with ``dim`` removed. Entries where ``mask == 0`` are dropped with ``where`` rather than
    multiplied by 0, so a non-finite value there cannot turn the sum into NaN.
    """
    m = mask.to(x.dtype)
    picked = torch.where(mask != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all dims when None).

    An empty mask gives 0 (the denominator is clamped to >= 1), never NaN.
    """
    count = mask.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1.0)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggregation,
    norm_length: int | None = None,
    totals: StepTotals | None = None,
) -> torch.Tensor:
    """Reduce ``per_token_loss[B, T]`` over ``mask[B, T]`` to a scalar ``Tensor[]``: this
    micro-batch's share of the step's loss (see the step contract above).

    With ``l`` the loss, ``m`` the mask, ``n_b = sum_t m[b, t]`` and the step's totals
    ``N`` (target tokens), ``S`` (sequences with targets), ``R`` (rows), ``W`` (longest):

    - ``"token-mean"``: ``sum_{b,t} m l / N``. Every target token weighs the same, so long
      answers weigh more (DAPO's token-level loss). 0 for an empty mask.
    - ``"seq-mean-token-mean"``: ``sum_{b: n_b > 0} (sum_t m[b] l[b] / n_b) / S``. Every
      sequence weighs the same (original GRPO); rows without targets are left out.
    - ``"seq-mean-token-sum-norm"``: ``sum_{b,t} m l / (R * norm_length)`` with a constant
      ``norm_length`` (``W`` when None). Dr.GRPO: no length-dependent normaliser, so there
      is no bias towards long wrong or short right answers. Use a fixed value such as the
      generation's max_tokens.

    ``totals`` None: those of ``mask`` alone (``N = sum m``, ``R = B``, ``W = T``), i.e. the
    mean over this batch. ``N`` and ``S`` are clamped to >= 1, so a step without targets
    gives 0, never NaN.
    """
    if per_token_loss.shape != mask.shape:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ"
        )
    if per_token_loss.dim() != 2:
        raise ValueError(f"expected [B, T] tensors, got shape {tuple(per_token_loss.shape)}")
    if totals is None:
        totals = StepTotals.of(mask)
    if mode == "token-mean":
        return masked_sum(per_token_loss, mask) / max(totals.target_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(per_token_loss, mask, dim=-1)  # [B]
        has_tokens = (mask != 0).any(dim=-1)  # [B]
        return masked_sum(per_seq, has_tokens) / max(totals.sequences, 1.0)
    if mode == "seq-mean-token-sum-norm":
        length = totals.longest if norm_length is None else norm_length
        if length <= 0:
            raise ValueError(f"norm_length must be positive, got {length}")
        return masked_sum(per_token_loss, mask) / (max(totals.rows, 1.0) * length)
    valid = ", ".join(LossAggregation)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid modes: {valid}")


def _check_logprobs(logprobs: torch.Tensor, batch: Batch) -> None:
    if logprobs.dim() != 2 or logprobs.shape != batch.loss_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} must be [B, T] like loss_mask "
            f"{tuple(batch.loss_mask.shape)}"
        )


def sft_loss(
    logprobs: torch.Tensor,
    batch: Batch,
    totals: StepTotals | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the target tokens, this micro-batch's share of the step's
    token mean: ``sum_{b,t} -m lp / N`` with ``N = totals.target_tokens`` (clamped to >= 1).

    Args:
        logprobs: ``Tensor[B, T]`` policy logprobs (with grad).
        batch: uses ``loss_mask[B, T]``.
        totals: the step's totals (see the step contract); None: this batch's own, i.e. the
            local mean ``sum -m lp / sum m``.

    Returns:
        ``(loss[], {"loss": loss, "num_tokens": sum m})``, metrics detached; both are shares:
        summed over the step's micro-batches and ranks they give the step's token mean and
        its target count.
    """
    _check_logprobs(logprobs, batch)
    lp = logprobs.float()
    mask = batch.loss_mask
    nll_sum = masked_sum(-lp, mask)
    num_tokens = mask.float().sum()
    denom = max((totals or StepTotals.of(mask)).target_tokens, 1.0)
    loss = nll_sum / denom
    return loss, {"loss": loss.detach(), "num_tokens": num_tokens.detach()}


# veRL's low_var_kl bounds: the log-ratio before exp, then the per-token estimate.
KL_LOG_RATIO_CLAMP = 20.0
KL_TOKEN_CLAMP = 10.0


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of ``KL(pi || pi_ref)``, elementwise.

    With ``d = ref_logprobs - logprobs`` (both ``Tensor[B, T]``)::

        k3 = exp(d) - d - 1   >= 0,   Tensor[B, T]

    Unbiased for the KL when tokens are sampled from ``pi`` and always non-negative.

    Clamped as veRL's ``low_var_kl``: ``d`` to ``[-20, 20]`` before the ``exp`` and ``k3`` to
    at most ``10``, so one token the reference finds far likelier (``exp(d)`` overflows to
    inf in fp32 from ``d ~ 89``) cannot make the loss infinite; a clamped token passes no
    gradient.
    """
    d = torch.clamp(ref_logprobs - logprobs, min=-KL_LOG_RATIO_CLAMP, max=KL_LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(d) - d - 1.0, max=KL_TOKEN_CLAMP)


@dataclass
class GRPOLossConfig:
    """Hyper-parameters of :func:`grpo_loss`.

    eps_low / eps_high: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]``;
        ``eps_high > eps_low`` is DAPO's clip-higher.
    beta: weight of the k3 KL penalty to the reference policy (0 turns it off and no
        ``ref_logprobs`` are needed).
    loss_agg / norm_length: see :func:`aggregate_loss`.
    tis_cap: cap ``C`` of truncated importance sampling between the rollout engine's
        logprobs and ``old_logprobs`` (corrects the generator/trainer numerics mismatch);
        None turns it off.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.04
    loss_agg: LossAggregation = LossAggregation["token-mean"]
    norm_length: int | None = None
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.loss_agg not in tuple(LossAggregation):  # a direct caller's string (a config's is an enum)
            raise ValueError(
                f"unknown loss_agg {self.loss_agg!r}; valid modes: {', '.join(LossAggregation)}"
            )
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"norm_length must be positive, got {self.norm_length}")
        if self.tis_cap is not None and self.tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be positive, got {self.tis_cap}")


def grpo_loss(
    logprobs: torch.Tensor,
    batch: Batch,
    cfg: GRPOLossConfig,
    totals: StepTotals | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss with optional k3 KL penalty and TIS.

    Inputs: ``logprobs[B, T]`` (with grad); from ``batch``: ``loss_mask[B, T]``,
    ``advantages[B]`` (required), ``old_logprobs[B, T]`` (None means on-policy: taken as
    ``logprobs.detach()``, so ratio = 1 but the gradient is ``-A * grad lp``),
    ``ref_logprobs[B, T]`` (required when ``beta > 0``), ``rollout_logprobs[B, T]``
    (used only when ``cfg.tis_cap`` is set).

    Per token, with ``A = advantages[:, None]``::

        r    = exp(lp - old_lp)
        pg   = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
        pg  *= w,  w = min(exp(old_lp - rollout_lp), tis_cap)   (detached; TIS only)
        loss = aggregate(pg + beta * k3(lp, ref_lp), loss_mask, cfg.loss_agg)

    The TIS weight multiplies only the policy-gradient term: it corrects the sampling
    distribution of the rollouts, while the KL term is already an estimate under ``pi``.

    ``totals``: the step's totals (see the step contract); None normalises over this batch.

    Returns ``(loss[], metrics)``; metrics are detached 0-d tensors, shares of the step's
    value (``ratio_max``: a maximum): ``loss``; ``pg_loss`` (aggregated like the loss);
    ``kl`` (token mean of k3, 0 when beta = 0); ``clip_fraction`` (share of target tokens
    where the clipped term is the strictly smaller one, i.e. where the gradient is cut);
    ``ratio_mean`` and ``ratio_max`` over target tokens (0 when there are none);
    ``tis_weight_mean`` when TIS is active.
    """
    _check_logprobs(logprobs, batch)
    if batch.advantages is None:
        raise ValueError("grpo_loss needs batch.advantages [B]")
    rows = logprobs.shape[0]
    if batch.advantages.shape != (rows,):
        raise ValueError(
            f"advantages must be [B] = [{rows}], got {tuple(batch.advantages.shape)}"
        )
    if cfg.beta > 0 and batch.ref_logprobs is None:
        raise ValueError(f"beta = {cfg.beta} > 0 needs batch.ref_logprobs; set beta = 0 to drop KL")

    mask = batch.loss_mask
    on_target = mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    if totals is None:
        totals = StepTotals.of(mask)
    num_targets = max(totals.target_tokens, 1.0)

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        # this micro-batch's share of the step's token mean of x
        return masked_sum(x, mask) / num_targets

    def _targets(x: torch.Tensor) -> torch.Tensor:
        # Zero non-targets before exp(): a -inf padding logprob would give inf there, and
        # 0 * inf = NaN in the backward pass even though the forward value is masked.
        return torch.where(on_target, x.float(), zero)

    lp = _targets(logprobs)
    old_lp = lp.detach() if batch.old_logprobs is None else _targets(batch.old_logprobs)
    adv = batch.advantages.float()[:, None]  # [B, 1], broadcast over tokens

    ratio = torch.exp(lp - old_lp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * adv
    pg = -torch.minimum(unclipped, clipped)
    clip_active = (clipped < unclipped).float()

    metrics: dict[str, torch.Tensor] = {}
    if cfg.tis_cap is not None and batch.rollout_logprobs is not None:
        rollout_lp = _targets(batch.rollout_logprobs)
        tis_w = torch.clamp(torch.exp(old_lp - rollout_lp), max=cfg.tis_cap).detach()
        pg = pg * tis_w
        metrics["tis_weight_mean"] = token_mean(tis_w)

    per_token = pg
    if cfg.beta > 0:
        assert batch.ref_logprobs is not None  # checked above
        kl = kl_k3(lp, _targets(batch.ref_logprobs))
        per_token = pg + cfg.beta * kl
        kl_metric = token_mean(kl)
    else:
        kl_metric = zero

    loss = aggregate_loss(per_token, mask, cfg.loss_agg, cfg.norm_length, totals)
    metrics.update(
        loss=loss,
        pg_loss=aggregate_loss(pg, mask, cfg.loss_agg, cfg.norm_length, totals),
        kl=kl_metric,
        clip_fraction=token_mean(clip_active),
        ratio_mean=token_mean(ratio),
        # ratio > 0, so zeroing non-targets cannot raise the max (and gives 0 when empty).
        ratio_max=torch.where(on_target, ratio, zero).max(),
    )
    return loss, {k: v.detach() for k, v in metrics.items()}
