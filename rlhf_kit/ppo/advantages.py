"""Step 3 of PPO, advantages: shaped per-token rewards (score + KL penalty), GAE advantages and returns,
or a critic-free estimator (RLOO, GRPO, Dr. GRPO, REINFORCE++) (the math is in ``rlhf_kit.rewards``,
``rlhf_kit.kl``, ``rlhf_kit.advantages`` and ``rlhf_kit.estimators``; this is its wiring).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from rlhf_kit.advantages import GAE, masked_mean, whiten
from rlhf_kit.estimators import (
    broadcast_to_tokens,
    grpo_advantages,
    needs_critic,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_kit.kl import kl_penalty
from rlhf_kit.losses import explained_variance
from rlhf_kit.ppo.experience import ExperienceConfig
from rlhf_kit.rewards import penalize_missing_eos, shape_rewards, standardize_scores
from rlhf_kit.rollout import Rollout
from rlhf_kit.training.metrics import scalars_to_floats


def advantages_now_or_in_update(
    rollout: Rollout, kl_coef: float, cfg: ExperienceConfig
) -> tuple[Rollout, dict, Callable[[Rollout], tuple[Rollout, dict]] | None]:
    """:func:`compute_advantages` on ``rollout`` now, or with ``cfg.score_in_update`` the function that
    :func:`~rlhf_kit.ppo.ppo_update` calls once it has scored the rollout itself (``advantages=``; the
    statistics then come with the update's). Returns the rollout, the statistics so far and that function."""
    if cfg.score_in_update:
        return rollout, {}, functools.partial(compute_advantages, kl_coef=kl_coef, cfg=cfg, read=False)
    return (*compute_advantages(rollout, kl_coef, cfg), None)


def global_mean(x: torch.Tensor, read: bool = True) -> float | torch.Tensor:
    """Mean of ``x`` over every element on every rank (sum and count all-reduced; plain mean without a
    process group): a float, or with ``read=False`` a 0-d float64 tensor left on the device."""
    count = torch.full((), float(x.numel()), dtype=torch.float64, device=x.device)  # a fill: no copy
    total = torch.stack([x.detach().double().sum(), count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    mean = total[0] / total[1].clamp(min=1)
    return mean.item() if read else mean


@torch.no_grad()
def compute_advantages(
    rollout: Rollout, kl_coef: float, cfg: ExperienceConfig, read: bool = True
) -> tuple[Rollout, dict]:
    """Fill in shaped rewards, advantages and returns with ``cfg.advantage_estimator``.

    ``gae``: GAE on the critic's values (whitened advantages if configured). ``rloo`` / ``grpo`` /
    ``dr_grpo``: the group baseline of each sequence's return (score minus ``kl_coef`` times its summed
    KL; ``cfg.group_size`` consecutive samples per prompt), broadcast to its tokens, returns = the
    sequence return on every token. ``reinforce_pp``: reward-to-go normalised over the global batch;
    ``reinforce_pp_baseline``: the same after subtracting each group's mean score (Hu 2025, sec. 3.3).
    With ``cfg.kl_in_loss`` the reward carries no KL (the policy loss does). Returns the completed
    rollout and statistics (mean KL per sequence, score stats, ...). ``kl/seq_mean`` is the mean over all
    ranks (collective: every rank calls this), because it drives the adaptive KL controller, which must
    see the same value everywhere; the other statistics are this rank's. With ``cfg.skip_old_logprobs``
    the rollout has no old log-probs yet, so ``kl/seq_mean`` is left to :func:`~rlhf_kit.ppo.ppo_update`.
    ``read=False`` leaves the statistics on the device (0-d tensors), for the caller to read with its own:
    scoring inside the update reads them after its backward passes are queued, since a read between the
    forward and the backward would empty the device's queue there.
    """
    if cfg.skip_old_logprobs and kl_coef and not cfg.kl_in_loss:
        raise ValueError(
            "compute_advantages: skip_old_logprobs leaves no old log-probs for a KL penalty in the reward "
            f"(kl_coef {kl_coef}); use kl_in_loss, a zero coefficient, or recompute them"
        )
    m = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * m
    scores = standardize_scores(rollout.scores, cfg.score_mean, cfg.score_std)
    scores = penalize_missing_eos(scores, rollout.finished, cfg.missing_eos_penalty)
    rewards = shape_rewards(scores, kl, m, 0.0 if cfg.kl_in_loss else kl_coef)
    est = cfg.advantage_estimator
    if needs_critic(est):
        adv, ret = GAE(cfg.gamma, cfg.lam)(rewards, rollout.values, m)
        if cfg.normalize_advantages:
            adv = whiten(adv, m)
    elif est in ("reinforce_pp", "reinforce_pp_baseline"):
        if est == "reinforce_pp_baseline":
            centred = grpo_advantages(scores, cfg.group_size, scale_by_std=False)  # score - group mean
            rewards = shape_rewards(centred, kl, m, 0.0 if cfg.kl_in_loss else kl_coef)
        adv, ret = reinforce_pp_advantages(rewards, m, cfg.gamma)
    else:
        seq_return = rewards.sum(-1)
        if est == "rloo":
            seq_adv = rloo_advantages(seq_return, cfg.group_size)
        else:
            seq_adv = grpo_advantages(seq_return, cfg.group_size, scale_by_std=est == "grpo")
        adv, ret = broadcast_to_tokens(seq_adv, m), broadcast_to_tokens(seq_return, m)
    out = Rollout(
        sequences=rollout.sequences,
        attention_mask=rollout.attention_mask,
        response_mask=m,
        logprobs=rollout.logprobs,
        ref_logprobs=rollout.ref_logprobs,
        values=rollout.values,
        rewards=rewards,
        advantages=adv,
        returns=ret,
        scores=scores,
        finished=rollout.finished,
    )
    lengths = m.float().sum(-1)
    # true KL (k1 summed over the sequence), whatever estimator shapes the reward
    seq_kl = ((rollout.logprobs - rollout.ref_logprobs) * m).sum(-1)
    stats = {
        "reward/score_mean": scores.mean(),
        "reward/score_std": scores.std() if scores.numel() > 1 else 0.0,
        "reward/raw_score_mean": rollout.scores.mean(),
        "reward/shaped_return_mean": rewards.sum(-1).mean(),
        **({} if cfg.skip_old_logprobs else {"kl/seq_mean": global_mean(seq_kl, read)}),
        "kl/coef": kl_coef,
        "response/length_mean": lengths.mean(),
        "response/finished_fraction": rollout.finished.float().mean(),
        "advantages/mean": masked_mean(adv, m),
        "advantages/std": (masked_mean(adv.square(), m) - masked_mean(adv, m).square()).clamp(min=0).sqrt(),
    }
    if needs_critic(est):
        stats["values/explained_variance"] = explained_variance(rollout.values, ret, m)
    return out, scalars_to_floats(stats) if read else stats  # one read of the device for all of them
