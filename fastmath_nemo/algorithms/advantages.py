"""Group-relative advantage estimators for GRPO (pure torch).

Rollouts are laid out group-major: ``N = P * G`` rewards for ``P`` prompts with ``G``
samples each, and row ``p * G + j`` is sample ``j`` of prompt ``p``. ``group_advantages``
maps ``rewards: Tensor[N]`` to one advantage per sequence, ``Tensor[N]``, which is what
``Batch.advantages`` holds (GRPO, or Dr.GRPO with ``scale_by_std=False``).
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: ``Tensor[N]``, grouped consecutively (row ``p * group_size + j``).
        group_size: ``G``, samples per prompt; ``N % G`` must be 0.
        scale_by_std: GRPO when True, Dr.GRPO (no std scaling) when False.
        eps: added to the std so that a constant-reward group gives 0, not NaN.

    Returns:
        ``Tensor[N]`` (float32, or the rewards' floating dtype)::

            A_i = r_i - mean_g(r)                          (scale_by_std=False)
            A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     (scale_by_std=True)

        ``std_g`` is the *unbiased* sample std (``torch.std``, correction=1) over the
        group, as in TRL's GRPOTrainer and the GRPO paper's reference code. A group of one
        sample has no spread and gets std 0 (so A = 0) rather than NaN.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards ({n}) is not divisible by group_size ({group_size}); "
            "rows must be P prompts x group_size samples, laid out consecutively"
        )
    r = rewards if rewards.is_floating_point() else rewards.float()
    grouped = r.view(-1, group_size)  # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        if group_size > 1:
            std = grouped.std(dim=1, keepdim=True, correction=1)
        else:
            # correction=1 over one sample is NaN; one sample carries no relative signal.
            std = torch.zeros_like(grouped)
        centred = centred / (std + eps)
    return centred.reshape(n)
