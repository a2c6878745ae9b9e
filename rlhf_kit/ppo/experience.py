"""Steps 1-2 of PPO, experience: generate, then score with actor, reference, critic and reward model
into a :class:`~rlhf_kit.rollout.Rollout` (rewards and advantages still zero: see ``advantages.py``).

The critic and reward model may live elsewhere (a critic server): anything with the
:class:`~rlhf_kit.ppo.remote.CriticInference` method ``infer`` stands in for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.models.layout import left_alignment
from rlhf_kit.models.value import response_values
from rlhf_kit.ppo.generate import generate_rollouts, generate_rollouts_dynamic, keep_generation_cache
from rlhf_kit.ppo.models import PPOModels
from rlhf_kit.ppo.remote import CriticInference
from rlhf_kit.ppo.scorers import RewardModelScorer
from rlhf_kit.rollout import Rollout

OLD_LOGPROBS = ("recompute", "sampler")


@dataclass
class ExperienceConfig:
    """How experience is scored and turned into advantages (the knobs of one PPO step)."""

    temperature: float = 1.0
    """Sampling temperature; log-probs of actor and reference are recomputed with it."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward (see rlhf_kit.kl.kl_penalty)."""
    gamma: float = 1.0
    lam: float = 0.95
    normalize_advantages: bool = True
    """Whiten advantages over all valid tokens (global statistics across ranks)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that never emitted EOS (None: off)."""
    score_mean: float = 0.0
    score_std: float = 1.0
    """Scores become (score - mean) / std (e.g. the RM's saved validation statistics)."""
    mask_truncated_responses: bool = False
    """Give responses without EOS no policy gradient (NeMo-Aligner's behaviour)."""
    micro_batch_size: int = 8
    """Samples per forward pass while scoring."""
    advantage_estimator: str = "gae"
    """``gae`` (with a critic) or a critic-free one of ``rlhf_kit.estimators.ESTIMATORS``."""
    group_size: int = 1
    """Samples per prompt, laid out as consecutive groups (the group estimators' baseline)."""
    kl_in_loss: bool = False
    """KL is a loss term (k3, GRPO style) instead of a reward penalty: the reward gets no KL."""
    skip_old_logprobs: bool = False
    """Score without the actor's forward pass: the update's own forward supplies the old log-probs
    (``old = current.detach()``, ratio 1). Exact only when the rollout makes one optimizer step (one
    epoch, one mini-batch) and the reward carries no KL (``kl_in_loss`` or a zero coefficient);
    :func:`~rlhf_kit.ppo.ppo_update` and :func:`~rlhf_kit.ppo.compute_advantages` refuse it otherwise.
    The rollout's ``logprobs`` then hold a copy of ``ref_logprobs`` (zero KL) as a placeholder."""
    score_in_update: bool = False
    """Score without the actor's and the critic's forward passes: the update's own passes supply the old
    log-probs and values (detached), and it computes rewards and advantages between its forward and its
    backward (:func:`~rlhf_kit.ppo.ppo_update` with ``advantages=``). Needs one optimizer step per rollout
    and the GAE estimator. When the rollout is one micro-batch, that saves two forward passes per step;
    otherwise the update runs them itself, without gradients, before its first micro-batch. The rollout
    holds placeholders until then (``logprobs`` a copy of ``ref_logprobs``, zero values)."""
    packed: bool | str = "auto"
    """Run the scoring passes (reference, actor, critic) padding-free: each micro-batch's real tokens end
    to end under variable-length attention (rlhf_kit.models.varlen); the same values up to kernel rounding.
    ``"auto"`` (or ``"on"``/``"off"``): where that is exact and fast, on CUDA (``varlen.use_packed``)."""
    old_logprobs: str = "recompute"
    """Where the old policy's log-probs come from (unless ``skip_old_logprobs``): ``"recompute"``, a forward
    pass of the actor over the rollout, or ``"sampler"``, the log-probs the generation backend reported for
    the tokens it sampled (the tempered distribution), with no forward pass. The sampler's numerics differ
    from the training model's (bf16 inference copy, other kernels and batch shapes), so with ``"sampler"``
    the KL penalty and the first ratio carry that difference (mean 0.006-0.017 nats per token on the
    benchmark models, docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"old_logprobs must be one of {OLD_LOGPROBS}, got {self.old_logprobs!r}")
        if self.score_in_update and self.advantage_estimator != "gae":
            raise ValueError(f"score_in_update needs the gae estimator, got {self.advantage_estimator!r}")
        if self.score_in_update and self.old_logprobs != "recompute":
            raise ValueError("score_in_update takes the old log-probs from the update's pass, not the sampler")


@torch.no_grad()
def make_experience(
    generation,
    actor: nn.Module,
    reference: nn.Module | None,
    critic: nn.Module | None,
    scorer: Callable[..., torch.Tensor] | None,
    cfg: ExperienceConfig,
    reference_fn: Callable[[], object] | None = None,
    remote: CriticInference | None = None,
) -> Rollout:
    """Score one batch of generations with the four models.

    Args:
        generation: a ``GenerationOutput`` (``sequences (b, p + n)``, ``attention_mask``,
            ``response_mask (b, n)``, ``finished (b,)``, ``prompt_length``).
        actor: causal LM being trained; its log-probs are recomputed here (the old policy), unless
            ``cfg.skip_old_logprobs`` (then the update computes them) or ``cfg.old_logprobs == "sampler"``
            (then they are ``generation.logprobs``).
        reference: frozen initial policy; ``None`` with ``reference_fn`` for LoRA, where
            ``reference_fn()`` returns a context manager that disables the adapter on ``actor``.
        critic: per-token value model (``TokenValueModel``); None with ``remote``, or with a
            critic-free ``cfg.advantage_estimator`` (values are then zero).
        scorer: ``RewardModelScorer`` or ``FunctionScorer``; None when ``remote`` scores with its
            reward model.
        remote: any :class:`CriticInference` (a critic server client, ``rlhf_kit.serving.RemoteCritic``,
            or an in-process ``CriticRewardService``): values, and scores unless ``scorer`` is
            given, come from one ``remote.infer`` call per micro-batch instead of ``critic``.

    Returns:
        A :class:`Rollout` with rewards/advantages/returns still zero (see :func:`compute_advantages`).
    """
    from rlhf_kit.estimators import needs_critic

    critic_free = not needs_critic(cfg.advantage_estimator)
    if cfg.score_in_update and remote is not None:
        raise ValueError(
            "make_experience: score_in_update needs the critic in this process, not a critic server"
        )
    if critic is None and remote is None and not critic_free:
        raise ValueError("make_experience: pass a critic, or a remote critic (remote=)")
    seq, am, rmask = generation.sequences, generation.attention_mask, generation.response_mask
    p = generation.prompt_length
    lps, refs, vals, scores = [], [], [], []
    for s in range(0, seq.shape[0], cfg.micro_batch_size):
        sl = slice(s, s + cfg.micro_batch_size)
        la = left_alignment(am[sl])  # one read of the padding for the reference, actor and critic passes
        if reference is not None:
            refs.append(
                sequence_logprobs(
                    reference, seq[sl], am[sl], p, cfg.temperature, alignment=la, packed=cfg.packed
                )
            )
        else:
            with reference_fn():
                refs.append(
                    sequence_logprobs(
                        actor, seq[sl], am[sl], p, cfg.temperature, alignment=la, packed=cfg.packed
                    )
                )
        # the old policy's log-probs; with skip_old_logprobs a zero-KL placeholder (the update's forward)
        if cfg.skip_old_logprobs or cfg.score_in_update:
            lps.append(refs[-1].clone())
        elif cfg.old_logprobs == "sampler":
            lps.append(generation.logprobs[sl].to(device=refs[-1].device, dtype=refs[-1].dtype))
        else:
            lps.append(
                sequence_logprobs(actor, seq[sl], am[sl], p, cfg.temperature, alignment=la, packed=cfg.packed)
            )
        score = None
        if remote is not None:
            value, score = remote.infer(seq[sl], am[sl], p, rmask[sl], with_scores=scorer is None)
        elif critic_free or cfg.score_in_update:  # no critic, or the update computes the values
            value = torch.zeros(rmask[sl].shape, device=seq.device)
        else:
            value = response_values(critic, seq[sl], am[sl], p, alignment=la, packed=cfg.packed)
        if score is None:
            if scorer is None:
                raise ValueError("make_experience: no scorer given and the critic server has no reward model")
            known = {"alignment": la} if isinstance(scorer, RewardModelScorer) else {}  # no read of its own
            score = scorer(seq[sl], am[sl], prompt_length=p, response_mask=rmask[sl], **known)
        vals.append(value)
        scores.append(score.float())
    m = rmask.float()
    logprobs = torch.cat(lps) * m
    raw_scores = torch.cat(scores)
    z = torch.zeros_like(logprobs)
    return Rollout(
        sequences=seq,
        attention_mask=am,
        response_mask=rmask,
        logprobs=logprobs,
        ref_logprobs=torch.cat(refs) * m,
        values=torch.cat(vals) * m,
        rewards=z,
        advantages=z.clone(),
        returns=z.clone(),
        scores=raw_scores,
        finished=generation.finished.to(raw_scores.device),
    )


def score_rollouts(
    generations: Sequence,
    actor: nn.Module,
    reference: nn.Module | None,
    critic: nn.Module | None,
    scorer: Callable[..., torch.Tensor] | None,
    cfg: ExperienceConfig,
    reference_fn: Callable[[], object] | None = None,
    pad_token_id: int = 0,
    remote: CriticInference | None = None,
) -> Rollout:
    """:func:`make_experience` on every generation batch, concatenated into one rollout."""
    from rlhf_kit.rollout import concat_rollouts

    parts = [
        make_experience(g, actor, reference, critic, scorer, cfg, reference_fn, remote) for g in generations
    ]
    return concat_rollouts(parts, pad_token_id)


def collect_experience(
    backend,
    prompts: Sequence[Sequence[int]],
    collate: Callable[[list], dict],
    params,
    models: PPOModels,
    scorer: Callable[..., torch.Tensor] | None,
    cfg: ExperienceConfig,
    *,
    generation_batch_size: int,
    device: torch.device | str,
    pad_token_id: int,
    dynamic: bool = False,
    offload_frozen: bool = False,
    phase: Callable[[str], object] | None = None,
    autocast: Callable[[], object] | None = None,
    remote: CriticInference | None = None,
    generation_cache: str = "release",
) -> tuple[Rollout, dict]:
    """Generate for ``prompts`` and score with the four models: the experience half of a PPO step.

    Args:
        dynamic: every rank passes the same global ``prompts`` and micro-batches are handed out first
            come, first served, then rebalanced (:func:`generate_rollouts_dynamic`); otherwise each rank
            passes its own share.
        offload_frozen: reference and reward model stay on CPU except while scoring.
        phase: ``phase(name)`` returns a context manager timing ``"generate"`` and ``"score"``
            (e.g. :class:`rlhf_kit.training.metrics.StepTimer`); ``autocast()`` one for mixed precision.
        remote: a critic server client; values and (with ``scorer=None``) scores come from it
            (see :func:`make_experience`).
        generation_cache: ``"release"`` frees the backend's KV cache and captured graphs after the
            rollout, ``"keep"`` keeps them for the next one, ``"auto"`` keeps them when small
            (:func:`~rlhf_kit.ppo.generate.keep_generation_cache`).

    Returns the rollout (advantages not yet computed) and statistics (generated tokens, dispatch).
    """
    from contextlib import nullcontext

    from rlhf_kit.training.offload import offload_model, offloaded

    phase = phase or (lambda name: nullcontext())
    autocast = autocast or nullcontext
    frozen = models.frozen() if offload_frozen else []
    stats: dict = {}
    with phase("generate"), torch.no_grad(), offloaded(*frozen, device=device):  # frozen back on exit
        try:
            if dynamic:
                gens, dispatch = generate_rollouts_dynamic(
                    backend, prompts, collate, params, generation_batch_size, device, pad_token_id,
                    release=False,
                )  # fmt: skip
                stats["dispatch/samples_generated_min"] = min(dispatch.counts_before)
                stats["dispatch/samples_generated_max"] = max(dispatch.counts_before)
                stats["dispatch/samples_moved"] = dispatch.moved
            else:
                gens = generate_rollouts(
                    backend, prompts, collate, params, generation_batch_size, device, release=False
                )
        finally:  # released on an error too, as generate_rollouts does with release=True
            if not keep_generation_cache(backend, generation_cache, device):
                backend.sleep()
    with phase("score"), autocast():
        m = models
        rollout = score_rollouts(
            gens, m.actor, m.reference, m.critic, scorer, cfg, m.reference_fn, pad_token_id, remote
        )
    for model in frozen:  # idle again until the next scoring phase
        offload_model(model)
    stats["rollout/generated_tokens"] = sum(int(g.response_mask.sum()) for g in gens)
    return rollout, stats
