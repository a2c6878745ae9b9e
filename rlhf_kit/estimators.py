"""Critic-free advantage estimators and policy-loss aggregation, as pure tensor functions.

Group estimators work on sequence scores ``(b,)`` laid out as ``b / K`` consecutive groups of ``K``
samples of the same prompt (``group_size = K``; :func:`rlhf_kit.ppo.repeat_prompts` builds that
layout); their advantage is broadcast to every response token. REINFORCE++ needs no groups: it
normalises per-token returns over the whole batch. None of them needs a critic (``values`` stay zero).

Estimators (``ESTIMATORS``): ``gae`` (with a critic, ``rlhf_kit.advantages.GAE``), ``rloo``, ``grpo``,
``dr_grpo``, ``reinforce_pp``, ``reinforce_pp_baseline`` (REINFORCE++ on scores minus their group mean).
"""

from __future__ import annotations

import torch

from rlhf_kit.advantages import discounted_cumsum, whiten

ESTIMATORS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def needs_critic(estimator: str) -> bool:
    """True only for ``gae``; ``ValueError`` for an unknown estimator."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    return estimator == "gae"


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(b,)`` -> ``(b / K, K)``; ``ValueError`` when ``b`` is not a multiple of ``K``."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (b,), got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores does not split into groups of {group_size}")
    return scores.float().view(-1, group_size)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740, eq. 5; Kool et al. 2019).

    ``A_i = s_i - mean_{j != i} s_j = K / (K - 1) * (s_i - mean_j s_j)`` within each group.
    Example: one group [1, 0, 0, 0] -> [1, -1/3, -1/3, -1/3]. ``scores (b,)`` -> ``(b,)``; K >= 2.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got group_size={group_size}")
    g = _groups(scores, group_size)
    loo = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - loo).view(-1)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, sec. 4.1.2).

    ``A_i = (s_i - mean_g) / (std_g + eps)`` with the unbiased group std (as TRL and OpenRLHF);
    ``scale_by_std=False`` is Dr. GRPO's ``A_i = s_i - mean_g`` (Liu et al. 2025, arXiv:2503.20783).
    Equal scores in a group give 0. ``scores (b,)`` -> ``(b,)``.
    """
    g = _groups(scores, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        std = g.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(g)
        adv = adv / (std + eps)
    return adv.view(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over masked positions.

    ``rewards``, ``mask`` ``(b, t)`` -> ``(b, t)``, zero where ``mask`` is 0.
    """
    m = mask.float()
    return discounted_cumsum(rewards.float() * m, gamma) * m


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262, sec. 3): per-token rewards (score on the last token,
    ``-beta * KL`` on every token: ``rlhf_kit.rewards.shape_rewards``) -> reward-to-go -> normalised
    over all valid tokens of the global batch (every rank of ``group`` when a process group is up).

    ``rewards``, ``mask`` ``(b, t)`` -> ``(advantages, returns)``, both ``(b, t)``.
    """
    ret = discounted_returns(rewards, mask, gamma)
    return whiten(ret, mask, group=group), ret


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence advantages ``(b,)`` on every response token: ``(b, t)``, zero where ``mask`` is 0."""
    return advantages.float()[:, None] * mask.float()


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", constant: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``(b, t)`` to a scalar.

    - ``token_mean``: ``sum(x m) / sum(m)`` over the batch (PPO, DAPO: long responses weigh more).
    - ``seq_mean_token_mean``: mean over sequences of each one's token mean (GRPO as published).
    - ``seq_mean_token_sum``: mean over sequences of each one's token sum, divided by ``constant``
      (Dr. GRPO, Liu et al. 2025: no length bias; ``constant`` is e.g. the longest response).
    """
    m = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "seq_mean_token_sum":
        if not constant or constant <= 0:
            raise ValueError("seq_mean_token_sum needs a positive constant (e.g. the max response length)")
        return (per_token * m).sum(-1).mean() / constant
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")


def aggregation_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What :func:`aggregate_loss` averages over, counted in ``mask (b, t)``: tokens for
    ``token_mean``, sequences otherwise (gradient accumulation weighs micro-batches by this)."""
    if mode == "token_mean":
        return mask.float().sum()
    return torch.full((), float(mask.shape[0]), device=mask.device)  # a fill: no host-to-device copy
