"""Losses as small modules returning ``(loss, stats)``; stats are detached typed tuples.

All token-level reductions are masked means over every valid token of the batch (token-level
averaging, as NeMo-Aligner and TRL do), so long responses weigh more than short ones.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlhf_kit.advantages import masked_mean
from rlhf_kit.estimators import AGGREGATIONS, aggregate_loss
from rlhf_kit.kl import kl_penalty


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; pass {new}= (the name of the recipe flag)", DeprecationWarning, 3)


class PairwiseStats(NamedTuple):
    accuracy: torch.Tensor
    chosen_mean: torch.Tensor
    rejected_mean: torch.Tensor
    margin_mean: torch.Tensor


class PairwiseRewardLoss(nn.Module):
    """Bradley-Terry pairwise loss (Ouyang et al. 2022, eq. 1) with an optional margin and centring.

    ``loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``; the centring
    term (Eisenstein et al. 2023) keeps rewards near zero so they need no later shift.
    """

    def __init__(self, margin: float = 0.0, center_coef: float = 0.0):
        super().__init__()
        self.margin = margin
        self.center_coef = center_coef

    def forward(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        margin: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PairwiseStats]:
        """Args: ``chosen_rewards``, ``rejected_rewards`` ``(b,)``; ``margin`` an optional per-pair
        ``(b,)`` margin replacing the scalar one. Accuracy counts ties as wrong."""
        rc, rr = chosen_rewards.float(), rejected_rewards.float()
        m = self.margin if margin is None else margin.float()
        loss = -F.logsigmoid(rc - rr - m).mean()
        if self.center_coef:
            loss = loss + self.center_coef * (rc + rr).square().mean()
        with torch.no_grad():
            stats = PairwiseStats(
                accuracy=(rc > rr).float().mean(),
                chosen_mean=rc.mean(),
                rejected_mean=rr.mean(),
                margin_mean=(rc - rr).mean(),
            )
        return loss, stats


class PolicyStats(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    entropy: torch.Tensor
    ref_kl: torch.Tensor | None = None
    """k3 KL to the reference (aggregated like the loss) when it is a loss term, else None."""


class PPOPolicyLoss(nn.Module):
    """Clipped surrogate objective (Schulman et al. 2017, arXiv:1707.06347, eq. 7) plus entropy bonus.

    ``loss = agg(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) - entropy_coef * H
    + kl_coef * agg(k3(logprobs, ref_logprobs))`` with ``ratio = exp(logprobs - old_logprobs)`` and
    ``eps = ratio_eps`` (the recipes' ``--ratio-eps``, NeMo-Aligner's ``ratio_eps``, TRL's ``cliprange``;
    ``clip_eps`` is a deprecated alias). ``agg`` is :func:`rlhf_kit.estimators.aggregate_loss` with
    ``aggregation`` (default the token mean; ``seq_mean_token_sum`` divides by ``norm_constant``); the KL
    term is GRPO's (Shao et al. 2024, eq. 3-4: k3 against the reference in the loss instead of the
    reward), off at ``kl_coef = 0``.
    """

    def __init__(
        self,
        ratio_eps: float = 0.2,
        entropy_coef: float = 0.0,
        aggregation: str = "token_mean",
        kl_coef: float = 0.0,
        norm_constant: float | None = None,
        *,
        clip_eps: float | None = None,
    ):
        super().__init__()
        if clip_eps is not None:
            _deprecated("PPOPolicyLoss(clip_eps=...)", "ratio_eps")
            ratio_eps = clip_eps
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
        if aggregation == "seq_mean_token_sum" and not (norm_constant and norm_constant > 0):
            raise ValueError("aggregation seq_mean_token_sum needs a positive norm_constant")
        self.ratio_eps = ratio_eps
        self.entropy_coef = entropy_coef
        self.aggregation = aggregation
        self.kl_coef = kl_coef
        self.norm_constant = norm_constant

    def _agg(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x, mask, self.aggregation, self.norm_constant)

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        entropy: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PolicyStats]:
        """Args: all ``(b, t)``; ``mask`` 1 on tokens that take gradient; ``entropy`` optional
        ``(b, t)`` (required when ``entropy_coef`` is non-zero); ``ref_logprobs`` the reference's
        log-probs (required when ``kl_coef`` is non-zero)."""
        log_ratio = logprobs - old_logprobs
        ratio = torch.exp(log_ratio)
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - self.ratio_eps, 1.0 + self.ratio_eps)
        pg = self._agg(torch.maximum(unclipped, clipped), mask)
        loss = pg
        ent = torch.zeros((), device=logprobs.device)
        if entropy is not None:
            ent = self._agg(entropy, mask)
            loss = loss - self.entropy_coef * ent
        elif self.entropy_coef:
            raise ValueError("entropy_coef is non-zero but no entropy was passed")
        ref_kl = None
        if self.kl_coef:
            if ref_logprobs is None:
                raise ValueError("kl_coef is non-zero but no ref_logprobs were passed")
            ref_kl = self._agg(kl_penalty(logprobs, ref_logprobs, "k3"), mask)
            loss = loss + self.kl_coef * ref_kl
        with torch.no_grad():
            stats = PolicyStats(
                loss=pg.detach(),
                clip_fraction=masked_mean((clipped > unclipped).float(), mask),
                # k3 estimator of KL(old || new) on the sampled tokens: low variance, non-negative.
                approx_kl=masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
                ratio_mean=masked_mean(ratio, mask),
                entropy=ent.detach(),
                ref_kl=None if ref_kl is None else ref_kl.detach(),
            )
        return loss, stats


class ValueStats(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    value_mean: torch.Tensor


class ValueLoss(nn.Module):
    """Clipped value loss (as in the PPO baselines and NeMo-Aligner's critic).

    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))`` with
    ``V_clip = V_old + clip(V - V_old, -value_clip, value_clip)``; ``value_clip = 0`` gives plain squared
    error (the recipes' ``--value-clip``, NeMo-Aligner's ``loss_clip_val``, TRL's ``cliprange_value``).
    ``clip`` is a deprecated alias.
    """

    def __init__(self, value_clip: float = 0.2, *, clip: float | None = None):
        super().__init__()
        if clip is not None:
            _deprecated("ValueLoss(clip=...)", "value_clip")
            value_clip = clip
        self.value_clip = value_clip

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ValueStats]:
        """Args: all ``(b, t)``."""
        values = values.float()
        err = (values - returns).square()
        if self.value_clip > 0:
            v_clip = old_values + (values - old_values).clamp(-self.value_clip, self.value_clip)
            err_clip = (v_clip - returns).square()
            per_token = torch.maximum(err, err_clip)
            clip_frac = masked_mean((err_clip > err).float(), mask)
        else:
            per_token = err
            clip_frac = torch.zeros((), device=values.device)
        loss = 0.5 * masked_mean(per_token, mask)
        with torch.no_grad():
            stats = ValueStats(
                loss=loss.detach(), clip_fraction=clip_frac, value_mean=masked_mean(values, mask)
            )
        return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over masked tokens: 1 is a perfect critic, 0 a constant one."""
    from rlhf_kit.advantages import masked_var

    var_r = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)
