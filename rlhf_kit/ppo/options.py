"""The estimator fields of the PPO recipe's config (advantage estimator, samples per prompt, loss
aggregation, where the KL goes) and their checks, defined and documented once here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EstimatorOptions:
    """Advantage estimator and policy-loss shape: PPO with a critic (GAE) or a critic-free estimator,
    where the policy loss's old log-probs come from, and whether scoring and the update skip padding."""

    advantage_estimator: Literal[
        "gae", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"
    ] = "gae"
    """gae: PPO with a critic. Critic-free (no critic is built, trained or saved): rloo (leave-one-out
    baseline), grpo (group mean / std), dr_grpo (group mean only), reinforce_pp (batch-normalised
    reward-to-go), reinforce_pp_baseline (the same on scores minus the group mean). See
    rlhf_kit.estimators and docs/ppo.md."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (a group; rloo/grpo/dr_grpo/reinforce_pp_baseline need >= 2). A step has
    --num-rollout-samples x this many samples; groups stay whole on one rank and in one mini-batch."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """Policy loss reduction: token mean over the mini-batch, mean of per-sequence token means (GRPO), or
    mean of per-sequence token sums over --loss-norm-constant (Dr. GRPO)."""
    loss_norm_constant: float | None = None
    """Divisor of seq_mean_token_sum; None: --max-new-tokens."""
    kl_in_loss: bool = False
    """KL to the reference as a loss term (k3, weight --kl-coef, GRPO style) instead of a per-token
    reward penalty."""
    old_logprobs: Literal["recompute", "sampler"] = "recompute"
    """The old policy's log-probs (KL penalty, ratio denominator): recompute (a forward pass of the actor
    while scoring) or sampler (those the generation backend reported, no forward pass; they carry the
    inference copy's numerical difference, 0.006-0.017 nats per token on the benchmark models)."""
    score_in_update: Literal["auto", "on", "off"] = "auto"
    """Skip the actor's and the critic's scoring passes: the update's forward passes, before its one
    optimizer step, give the old log-probs and values, then the rewards and advantages, then the losses
    (two forward passes fewer per step when the rollout is one micro-batch; that micro-batch then holds
    both models' activations at once, so under a token budget it is taken only if twice its tokens fit;
    else the update scores first, without gradients). Needs --advantage-estimator gae, --ppo-epochs 1,
    one global batch per rollout, no critic warm-up, no critic server and --old-logprobs recompute.
    auto: where those hold, on CUDA; on: refused where they do not; off: score first."""
    packed_passes: Literal["auto", "on", "off"] = "auto"
    """Score and train padding-free: each micro-batch's real tokens end to end in one sequence under
    variable-length flash attention (torch.nn.attention.varlen), no compute on padding. auto: on CUDA for
    the model types verified (rlhf_kit.models.varlen.PACKED_MODEL_TYPES) of hidden size 1024 or more (a
    narrower model ran slower packed), with no sliding window shorter than the rows (with
    --gradient-checkpointing too); on: pack any verified model; off: padded passes."""


def check_estimator_options(cfg, world_size: int) -> None:
    """One-line ``ValueError`` for estimator settings that cannot work together (before any model)."""
    from rlhf_kit.estimators import GROUP_ESTIMATORS, needs_critic
    from rlhf_kit.ppo.wiring import score_in_update_possible

    k = cfg.samples_per_prompt
    if k < 1:
        raise ValueError(f"--samples-per-prompt must be >= 1, got {k}")
    if cfg.advantage_estimator in GROUP_ESTIMATORS and k < 2:
        raise ValueError(f"--advantage-estimator {cfg.advantage_estimator} needs --samples-per-prompt >= 2")
    if (cfg.global_batch_size // world_size) % k:
        raise ValueError(
            f"--global-batch-size {cfg.global_batch_size} over {world_size} rank(s) must hold whole groups "
            f"of --samples-per-prompt {k}"
        )
    if k > 1 and cfg.dynamic_dispatch:
        raise ValueError("--dynamic-dispatch rebalances samples across ranks and would split groups")
    if not needs_critic(cfg.advantage_estimator):
        if cfg.critic_server is not None:
            raise ValueError(
                f"--critic-server with --advantage-estimator {cfg.advantage_estimator}: no critic"
            )
        if cfg.critic_warmup_steps:
            raise ValueError("--critic-warmup-steps needs a critic (--advantage-estimator gae)")
    if cfg.score_in_update == "on" and not score_in_update_possible(cfg):
        raise ValueError(
            "--score-in-update on needs --advantage-estimator gae, --ppo-epochs 1, --num-rollout-samples x "
            "--samples-per-prompt = --global-batch-size, no critic warm-up, no --critic-server and "
            "--old-logprobs recompute"
        )
    if cfg.kl_in_loss and cfg.adaptive_kl:
        raise ValueError("--kl-in-loss takes a fixed --kl-coef (no --adaptive-kl)")
