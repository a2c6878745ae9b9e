"""Reward shaping: per-token KL penalty plus the sequence score on the last response token.

``r_t = -kl_coef * kl_t`` for every response token, and ``r_T += score`` at the last one (Ziegler et
al. 2019; Stiennon et al. 2020). Responses that never emitted EOS can have their score replaced or
lowered (the "EOS trick" of Huang et al. 2023), and scores can be standardised with the reward
model's saved statistics so that SFT outputs score about 0.
"""

from __future__ import annotations

import torch

from rlhf_kit.models.heads import last_token_index


def standardize_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(scores - mean) / std`` with fixed statistics (e.g. the RM's validation statistics)."""
    if std <= 0:
        raise ValueError(f"reward std must be > 0, got {std}")
    return (scores - mean) / std


def penalize_missing_eos(
    scores: torch.Tensor, finished: torch.Tensor, penalty: float | None, replace: bool = False
) -> torch.Tensor:
    """Apply ``penalty`` to the ``(b,)`` scores of responses whose ``finished`` flag is False.

    ``replace=False`` subtracts ``penalty`` (TRL's ``missing_eos_penalty``); ``replace=True`` sets
    the score to ``penalty`` (a fixed low score, as in lm-human-preference-details). ``None``: no-op.
    """
    if penalty is None:
        return scores
    unfinished = ~finished.bool()
    if replace:
        return torch.where(unfinished, torch.full_like(scores, penalty), scores)
    return scores - penalty * unfinished.to(scores.dtype)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards.

    Args:
        scores: ``(b,)`` sequence scores (already standardised / penalised as wanted).
        kl: ``(b, t)`` per-token KL estimates (see :func:`rlhf_kit.kl.kl_penalty`).
        mask: ``(b, t)`` response mask.
        kl_coef: the KL coefficient (controller value).

    Returns:
        ``(b, t)`` float32: ``-kl_coef * kl * mask`` with ``scores`` added at each row's last masked
        position.
    """
    m = mask.float()
    rewards = -kl_coef * kl.float() * m
    idx = last_token_index(mask)
    has_tokens = m.sum(-1) > 0
    add = torch.where(has_tokens, scores.float(), torch.zeros_like(scores.float()))
    return rewards.scatter_add(1, idx[:, None], add[:, None])
