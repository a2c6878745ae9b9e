"""One PPO step as plain functions: score experience, shape rewards and advantages, update.

A custom loop composes them (``recipes/ppo.py`` is one such loop)::

    gen = backend.generate(prompt_ids, prompt_mask, params)            # rlhf_kit.generation
    rollout = make_experience(gen, actor, ref, critic, scorer, cfg)     # logprobs, values, scores
    rollout = compute_advantages(rollout, kl_coef, cfg)                 # rewards, GAE, whitening
    stats = ppo_update(actor, critic, ..., RolloutBuffer with rollout)  # clipped losses, accumulation

The critic and reward model can also live in a separate job (``rlhf_kit.serving``): ``make_experience``
then takes values and scores from it, ``ppo_update`` runs actor-only (``UpdateConfig.train_critic=False``)
and the server trains the critic with the same ``ppo_update``, critic-only.

Alignment: response position ``i`` holds the log-prob of response token ``i`` and the critic's value of
the state that generates it (hidden state one position earlier); ``response_mask`` includes EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from rlhf_kit.advantages import GAE, masked_mean, whiten
from rlhf_kit.kl import kl_penalty
from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.losses import PPOPolicyLoss, ValueLoss, explained_variance
from rlhf_kit.models.attention import padding_safe_sdpa
from rlhf_kit.models.reward import reward_scores
from rlhf_kit.models.value import response_values
from rlhf_kit.rewards import penalize_missing_eos, shape_rewards, standardize_scores
from rlhf_kit.rollout import Rollout, RolloutBuffer, split_rollout
from rlhf_kit.training.precision import grad_holder

if TYPE_CHECKING:
    from rlhf_kit.serving import CriticRewardService, RemoteCritic


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


class RewardModelScorer:
    """Scores ``(b, p + n)`` token sequences with an HF reward model at the last real token."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, **_) -> torch.Tensor:
        return reward_scores(self.model, sequences, attention_mask)


def decode_prompts_and_responses(
    tokenizer,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    response_mask: torch.Tensor,
) -> tuple[list[str], list[str]]:
    """Decoded prompt and response texts (padding and special tokens removed) of a ``(b, p + n)`` batch."""
    p = prompt_length
    prompts = tokenizer.batch_decode(
        [s[:p][m[:p].bool()] for s, m in zip(sequences, attention_mask)], skip_special_tokens=True
    )
    responses = tokenizer.batch_decode(
        [s[p:][r.bool()] for s, r in zip(sequences, response_mask)], skip_special_tokens=True
    )
    return prompts, responses


class FunctionScorer:
    """Wraps a Python reward function ``fn(prompts: list[str], responses: list[str]) -> list[float]``
    (verifiable rewards) so it stands in for a reward model. Texts are decoded without special tokens.
    """

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], tokenizer):
        self.fn = fn
        self.tokenizer = tokenizer

    def __call__(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, *, prompt_length: int, response_mask
    ) -> torch.Tensor:
        prompts, responses = decode_prompts_and_responses(
            self.tokenizer, sequences, attention_mask, prompt_length, response_mask
        )
        scores = self.fn(prompts, responses)
        if len(scores) != len(prompts):
            raise ValueError(f"reward function returned {len(scores)} scores for {len(prompts)} samples")
        return torch.tensor([float(s) for s in scores], device=sequences.device)


@torch.no_grad()
def make_experience(
    generation,
    actor: nn.Module,
    reference: nn.Module | None,
    critic: nn.Module | None,
    scorer: Callable[..., torch.Tensor] | None,
    cfg: ExperienceConfig,
    reference_fn: Callable[[], object] | None = None,
    remote: CriticRewardService | RemoteCritic | None = None,
) -> Rollout:
    """Score one batch of generations with the four models.

    Args:
        generation: a ``GenerationOutput`` (``sequences (b, p + n)``, ``attention_mask``,
            ``response_mask (b, n)``, ``finished (b,)``, ``prompt_length``).
        actor: causal LM being trained; its log-probs are recomputed here (the old policy).
        reference: frozen initial policy; ``None`` with ``reference_fn`` for LoRA, where
            ``reference_fn()`` returns a context manager that disables the adapter on ``actor``.
        critic: per-token value model (``TokenValueModel``); None with ``remote``.
        scorer: ``RewardModelScorer`` or ``FunctionScorer``; None when ``remote`` scores with its
            reward model.
        remote: a critic server client (:class:`rlhf_kit.serving.RemoteCritic`, or an in-process
            :class:`~rlhf_kit.serving.CriticRewardService`): values, and scores unless ``scorer`` is
            given, come from one ``remote.infer`` call per micro-batch instead of ``critic``.

    Returns:
        A :class:`Rollout` with rewards/advantages/returns still zero (see :func:`compute_advantages`).
    """
    if critic is None and remote is None:
        raise ValueError("make_experience: pass a critic, or a remote critic (remote=)")
    seq, am, rmask = generation.sequences, generation.attention_mask, generation.response_mask
    p = generation.prompt_length
    lps, refs, vals, scores = [], [], [], []
    for s in range(0, seq.shape[0], cfg.micro_batch_size):
        sl = slice(s, s + cfg.micro_batch_size)
        lps.append(sequence_logprobs(actor, seq[sl], am[sl], p, cfg.temperature))
        if reference is not None:
            refs.append(sequence_logprobs(reference, seq[sl], am[sl], p, cfg.temperature))
        else:
            with reference_fn():
                refs.append(sequence_logprobs(actor, seq[sl], am[sl], p, cfg.temperature))
        score = None
        if remote is not None:
            value, score = remote.infer(seq[sl], am[sl], p, rmask[sl], with_scores=scorer is None)
        else:
            value = response_values(critic, seq[sl], am[sl], p)
        if score is None:
            if scorer is None:
                raise ValueError("make_experience: no scorer given and the critic server has no reward model")
            score = scorer(seq[sl], am[sl], prompt_length=p, response_mask=rmask[sl])
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


@torch.no_grad()
def compute_advantages(rollout: Rollout, kl_coef: float, cfg: ExperienceConfig) -> tuple[Rollout, dict]:
    """Fill in shaped rewards, GAE advantages and returns (whitened advantages if configured).

    Returns the completed rollout and statistics (mean KL per sequence, score stats, ...).
    """
    m = rollout.response_mask
    kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, cfg.kl_estimator) * m
    scores = standardize_scores(rollout.scores, cfg.score_mean, cfg.score_std)
    scores = penalize_missing_eos(scores, rollout.finished, cfg.missing_eos_penalty)
    rewards = shape_rewards(scores, kl, m, kl_coef)
    adv, ret = GAE(cfg.gamma, cfg.lam)(rewards, rollout.values, m)
    if cfg.normalize_advantages:
        adv = whiten(adv, m)
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
        "reward/score_mean": scores.mean().item(),
        "reward/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
        "reward/raw_score_mean": rollout.scores.mean().item(),
        "reward/shaped_return_mean": rewards.sum(-1).mean().item(),
        "kl/seq_mean": seq_kl.mean().item(),
        "kl/coef": kl_coef,
        "response/length_mean": lengths.mean().item(),
        "response/finished_fraction": rollout.finished.float().mean().item(),
        "advantages/mean": masked_mean(adv, m).item(),
        "advantages/std": (masked_mean(adv.square(), m) - masked_mean(adv, m).square())
        .clamp(min=0)
        .sqrt()
        .item(),
        "values/explained_variance": explained_variance(rollout.values, ret, m).item(),
    }
    return out, stats


def _global_count(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks (no-op without a process group)."""
    x = x.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@dataclass
class UpdateConfig:
    """How one rollout trains the actor and the critic."""

    mini_batch_size: int = 64
    """Samples per optimizer step on this rank (global batch / world size)."""
    micro_batch_size: int = 8
    """Samples per forward/backward; mini_batch_size / micro_batch_size steps of accumulation."""
    ppo_epochs: int = 1
    max_grad_norm: float = 1.0
    train_actor: bool = True
    """False during critic warm-up."""
    train_critic: bool = True
    """False when the critic trains elsewhere (a critic server, ``rlhf_kit.serving``): actor-only update."""


def ppo_update(
    actor: nn.Module | None,
    critic: nn.Module | None,
    actor_opt: torch.optim.Optimizer | None,
    critic_opt: torch.optim.Optimizer | None,
    buffer: RolloutBuffer,
    policy_loss: PPOPolicyLoss | None,
    value_loss: ValueLoss | None,
    cfg: UpdateConfig,
    exp_cfg: ExperienceConfig,
    backward: Callable[[torch.Tensor], None] | None = None,
    clip_grad: Callable[[nn.Module, float], float] | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """``ppo_epochs`` passes over the buffer in mini-batches, each one optimizer step per model with
    gradient accumulation over micro-batches.

    Each micro-batch's loss is weighted by its share of the mini-batch's valid tokens (counted over
    all ranks), so the accumulated gradient equals that of one token-level mean over the whole
    mini-batch: micro 1 x accumulation 4 gives the same step as micro 4 x accumulation 1.

    The actor trains when ``cfg.train_actor`` and ``actor_opt`` is given; the critic when
    ``cfg.train_critic`` (a critic server runs this function critic-only, the actor job actor-only,
    and the mini-batch order depends only on the buffer's seed, so the split run equals the joint one).
    ``backward`` defaults to ``loss.backward()`` (pass ``accelerator.backward``); ``clip_grad`` to
    ``torch.nn.utils.clip_grad_norm_``. Returns mean statistics over all micro-batches.
    """
    train_actor = cfg.train_actor and actor_opt is not None
    train_critic = cfg.train_critic
    if train_actor and (actor is None or policy_loss is None):
        raise ValueError("ppo_update: training the actor needs actor and policy_loss")
    if train_critic and (critic is None or critic_opt is None or value_loss is None):
        raise ValueError(
            "ppo_update: training the critic needs critic, critic_opt and value_loss "
            "(UpdateConfig.train_critic=False trains the actor only)"
        )
    backward = backward or (lambda loss: loss.backward())
    clip_grad = clip_grad or (lambda m, n: float(torch.nn.utils.clip_grad_norm_(m.parameters(), n)))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    totals: dict[str, float] = {}
    n_micro = 0

    def add(key: str, value) -> None:
        totals[key] = totals.get(key, 0.0) + float(value)

    for mb in buffer.minibatches(cfg.mini_batch_size, epochs=cfg.ppo_epochs, device=device):
        if train_actor:
            p_tokens = _global_count(_policy_mask(mb, exp_cfg).sum()).clamp(min=1)
        if train_critic:
            v_tokens = _global_count(mb.response_mask.float().sum()).clamp(min=1)
        for micro in split_rollout(mb, cfg.micro_batch_size):
            # cuDNN's SDPA backward is NaN on the left-padding rows: see rlhf_kit.models.attention
            with padding_safe_sdpa():
                p = micro.prompt_length
                if train_actor:
                    pm = _policy_mask(micro, exp_cfg)
                    lp, ent = sequence_logprobs(
                        actor,
                        micro.sequences,
                        micro.attention_mask,
                        p,
                        exp_cfg.temperature,
                        with_entropy=True,
                    )
                    loss, ps = policy_loss(lp, micro.logprobs, micro.advantages, pm, ent)
                    backward(loss * (pm.sum() * world / p_tokens))
                    add("policy/loss", ps.loss)
                    add("policy/clip_fraction", ps.clip_fraction)
                    add("policy/approx_kl", ps.approx_kl)
                    add("policy/ratio_mean", ps.ratio_mean)
                    add("policy/entropy", ps.entropy)
                if train_critic:
                    vm = micro.response_mask.float()
                    values = response_values(critic, micro.sequences, micro.attention_mask, p)
                    vloss, vs = value_loss(values, micro.values, micro.returns, vm)
                    backward(vloss * (vm.sum() * world / v_tokens))
                    add("value/loss", vs.loss)
                    add("value/clip_fraction", vs.clip_fraction)
                    add("value/mean", vs.value_mean)
            n_micro += 1
        if train_actor:
            add("policy/grad_norm", clip_grad(grad_holder(actor, actor_opt), cfg.max_grad_norm))
            actor_opt.step()
            actor_opt.zero_grad(set_to_none=True)
        if train_critic:
            add("value/grad_norm", clip_grad(grad_holder(critic, critic_opt), cfg.max_grad_norm))
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)
        add("_steps", 1)
    steps = max(totals.pop("_steps", 1), 1)
    out = {}
    for k, v in totals.items():
        out[k] = v / (steps if k.endswith("grad_norm") else max(n_micro, 1))
    return out


def _policy_mask(r: Rollout, cfg: ExperienceConfig) -> torch.Tensor:
    """Tokens that take policy gradient: the response, minus unfinished responses if configured."""
    mask = r.response_mask.float()
    if cfg.mask_truncated_responses:
        mask = mask * r.finished.float()[:, None]
    return mask


class PromptStream:
    """An endless, resumable stream of tokenised prompts: shuffled each epoch with ``seed + epoch``.

    ``next_batch(n)`` returns the next ``n`` prompts of the global order; a data-parallel rank takes its
    own slice with ``rank`` / ``world_size``. ``state_dict()`` is the exact data position.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptStream: no prompts")
        self.prompts = [list(p) for p in prompts]
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self, n: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The next ``n`` prompts of the global stream (all ranks advance together); this rank gets
        rows ``rank::world_size`` of them."""
        out = []
        for _ in range(n):
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._make_order()
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out[rank::world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = self._make_order()


def mean_over_ranks(stats: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average scalar statistics over data-parallel ranks (one all-reduce; identity on one process).

    Each rank's statistic is already a mean over its own samples; ranks hold equal sample counts.
    """
    from rlhf_kit.training.dist import all_reduce_sum, world_size

    keys = sorted(stats)
    sums = all_reduce_sum([float(stats[k]) for k in keys], device)
    return {k: v / world_size() for k, v in zip(keys, sums)}


def generate_rollouts(
    backend,
    prompts: Sequence[Sequence[int]],
    collate: Callable[[list], dict],
    params,
    micro_batch_size: int,
    device: torch.device | str,
    release: bool = True,
) -> list:
    """Generate for ``prompts`` in micro-batches of ``micro_batch_size`` (left-padded by ``collate``),
    waking the backend's KV cache for the duration; ``release=False`` keeps the cache (and the compiled
    backend's captured graphs) for the next rollout when memory allows. Returns one ``GenerationOutput``
    per micro-batch."""
    outs = []
    backend.wake()
    try:
        for s in range(0, len(prompts), micro_batch_size):
            batch = collate(list(prompts[s : s + micro_batch_size]))
            outs.append(
                backend.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), params)
            )
    finally:
        if release:
            backend.sleep()
    return outs


def score_rollouts(
    generations: Sequence,
    actor: nn.Module,
    reference: nn.Module | None,
    critic: nn.Module | None,
    scorer: Callable[..., torch.Tensor] | None,
    cfg: ExperienceConfig,
    reference_fn: Callable[[], object] | None = None,
    pad_token_id: int = 0,
    remote: CriticRewardService | RemoteCritic | None = None,
) -> Rollout:
    """:func:`make_experience` on every generation batch, concatenated into one rollout."""
    from rlhf_kit.rollout import concat_rollouts

    parts = [
        make_experience(g, actor, reference, critic, scorer, cfg, reference_fn, remote) for g in generations
    ]
    return concat_rollouts(parts, pad_token_id)


def decode_samples(tokenizer, rollout: Rollout, n: int = 4, prompt_chars: int = 200) -> list[list]:
    """``[prompt tail, response, score]`` rows of the first ``n`` samples, for a log table."""
    r = rollout[:n]
    prompts, responses = decode_prompts_and_responses(
        tokenizer, r.sequences, r.attention_mask, r.prompt_length, r.response_mask
    )
    return [[p[-prompt_chars:], resp, float(s)] for p, resp, s in zip(prompts, responses, r.scores)]


def split_generation(gen) -> list[dict[str, torch.Tensor]]:
    """One dict per sample of a ``GenerationOutput``, padding removed: ``prompt (p_i,)``, ``response
    (n_i,)``, ``response_mask (n_i,)``, ``logprobs (n_i,)``, ``finished ()``. Inverse: :func:`merge_generations`."""
    p = gen.prompt_length
    out = []
    for i in range(gen.sequences.shape[0]):
        n_i = int(gen.response_mask[i].sum())
        prompt_mask = gen.attention_mask[i, :p].bool()
        out.append(
            {
                "prompt": gen.sequences[i, :p][prompt_mask],
                "response": gen.sequences[i, p : p + n_i],
                "response_mask": gen.response_mask[i, :n_i],
                "logprobs": gen.logprobs[i, :n_i],
                "finished": gen.finished[i],
            }
        )
    return out


def merge_generations(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int):
    """Samples from :func:`split_generation` back into one ``GenerationOutput`` (prompts left-padded,
    responses right-padded to the longest of the group)."""
    from rlhf_kit.generation.base import GenerationOutput

    if not samples:
        raise ValueError("merge_generations: no samples")
    b = len(samples)
    p = max(len(s["prompt"]) for s in samples)
    n = max(1, max(len(s["response"]) for s in samples))
    ref = samples[0]["prompt"]
    seq = torch.full((b, p + n), pad_token_id, dtype=ref.dtype, device=ref.device)
    am = torch.zeros((b, p + n), dtype=torch.long, device=ref.device)
    rmask = torch.zeros((b, n), dtype=torch.long, device=ref.device)
    logprobs = torch.zeros((b, n), dtype=torch.float32, device=ref.device)
    for i, s in enumerate(samples):
        lp, ln = len(s["prompt"]), len(s["response"])
        seq[i, p - lp : p] = s["prompt"]
        seq[i, p : p + ln] = s["response"]
        am[i, p - lp : p] = 1
        am[i, p : p + ln] = s["response_mask"]
        rmask[i, :ln] = s["response_mask"]
        logprobs[i, :ln] = s["logprobs"]
    finished = torch.stack([s["finished"].bool() for s in samples])
    return GenerationOutput(seq, p, rmask, logprobs, finished, am)


def generate_rollouts_dynamic(
    backend,
    prompts: Sequence[Sequence[int]],
    collate: Callable[[list], dict],
    params,
    micro_batch_size: int,
    device: torch.device | str,
    pad_token_id: int,
) -> tuple[list, object]:
    """Data-parallel generation with dynamic hand-out (a rank that finishes early takes more), then a
    rebalance so every rank scores and trains on the same number of samples.

    Every rank passes the same global ``prompts``; micro-batches of ``micro_batch_size`` are claimed
    first come, first served from a counter in the process group's store. The backend must generate
    locally (an inference copy, or an unsharded model): FSDP-sharded generation is collective.
    Returns this rank's generations (micro-batches of ``micro_batch_size``) and the rebalance stats.
    """
    from rlhf_kit.generation.dispatch import DynamicDispatcher, rebalance_rollouts

    chunks = [list(prompts[s : s + micro_batch_size]) for s in range(0, len(prompts), micro_batch_size)]
    samples: list[dict] = []
    try:
        for i in DynamicDispatcher(len(chunks)):
            (gen,) = generate_rollouts(
                backend, chunks[i], collate, params, micro_batch_size, device, release=False
            )
            samples += [{k: v.cpu() for k, v in s.items()} for s in split_generation(gen)]
    finally:
        backend.sleep()
    samples, stats = rebalance_rollouts(samples)
    samples = [{k: v.to(device) for k, v in s.items()} for s in samples]
    groups = [samples[s : s + micro_batch_size] for s in range(0, len(samples), micro_batch_size)]
    return [merge_generations(g, pad_token_id) for g in groups], stats


@dataclass
class PPOModels:
    """The four PPO models. ``reference`` is None with LoRA, where ``reference_fn()`` returns a context
    manager that disables the actor's adapters; ``reward_model`` is None when a reward function or a
    critic server scores; ``critic`` is None when a critic server holds it."""

    actor: nn.Module
    critic: nn.Module | None
    reference: nn.Module | None = None
    reward_model: nn.Module | None = None
    reference_fn: Callable[[], object] | None = None

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.reference, self.reward_model) if m is not None]


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
    remote: CriticRewardService | RemoteCritic | None = None,
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

    Returns the rollout (advantages not yet computed) and statistics (generated tokens, dispatch).
    """
    from contextlib import nullcontext

    from rlhf_kit.training.offload import offload_model, offloaded

    phase = phase or (lambda name: nullcontext())
    autocast = autocast or nullcontext
    frozen = models.frozen() if offload_frozen else []
    stats: dict = {}
    with phase("generate"), torch.no_grad(), offloaded(*frozen, device=device):  # frozen back on exit
        if dynamic:
            gens, dispatch = generate_rollouts_dynamic(
                backend, prompts, collate, params, generation_batch_size, device, pad_token_id
            )
            stats["dispatch/samples_generated_min"] = min(dispatch.counts_before)
            stats["dispatch/samples_generated_max"] = max(dispatch.counts_before)
            stats["dispatch/samples_moved"] = dispatch.moved
        else:
            gens = generate_rollouts(backend, prompts, collate, params, generation_batch_size, device)
    with phase("score"), autocast():
        m = models
        rollout = score_rollouts(
            gens, m.actor, m.reference, m.critic, scorer, cfg, m.reference_fn, pad_token_id, remote
        )
    for model in frozen:  # idle again until the next scoring phase
        offload_model(model)
    stats["rollout/generated_tokens"] = sum(int(g.response_mask.sum()) for g in gens)
    return rollout, stats


def load_critic_and_reward_model(
    critic: str | None,
    reward_model: str | None,
    *,
    vocab_size: int | None = None,
    gradient_checkpointing: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module | None, nn.Module | None]:
    """The trainable critic and the frozen reward model from HF directories (either may be None), dropout
    off: the critic is a :class:`TokenValueModel` of ``critic`` (a reward model: its score head becomes the
    value head), left on CPU for the caller to place; the reward model is frozen on ``device``. With
    ``vocab_size`` (the actor tokenizer's size), raises ``ValueError`` when a vocabulary is smaller.
    """
    from rlhf_kit.models import TokenValueModel, disable_dropout, load_reward_model
    from rlhf_kit.training.hf import load_for_training

    value = None
    if critic is not None:
        value = TokenValueModel(load_for_training(critic, "reward", None, gradient_checkpointing))
    rm = None
    if reward_model is not None:
        rm = load_reward_model(reward_model).eval().requires_grad_(False).to(device)
    for name, model in (("critic", value), ("reward model", rm)):
        if model is None:
            continue
        if vocab_size is not None and model.config.vocab_size < vocab_size:
            raise ValueError(
                f"the {name} has a vocabulary of {model.config.vocab_size}, smaller than the actor "
                f"tokenizer's {vocab_size}: it does not share the actor's tokenizer"
            )
        disable_dropout(model)
    return value, rm


def load_ppo_models(
    actor: str,
    critic: str | None,
    reward_model: str | None,
    tokenizer,
    *,
    lora=None,
    gradient_checkpointing: bool = False,
    device: torch.device | str = "cpu",
) -> PPOModels:
    """Load the four models from HF directories (or hub names), dropout off everywhere.

    The actor is trainable (``lora``: a :class:`rlhf_kit.training.hf.LoraSettings`; with ``r > 0`` only
    the adapters train and the reference is the actor with adapters disabled, no second copy);
    otherwise the reference is a frozen copy of ``actor`` on ``device``. The critic and the reward model
    come from :func:`load_critic_and_reward_model`; ``critic`` is None when a critic server holds it,
    ``reward_model`` None when a reward function or a critic server scores. Raises ``ValueError`` when a
    model's vocabulary cannot hold the actor tokenizer's ids.
    """
    from transformers import AutoModelForCausalLM

    from rlhf_kit.models import disable_dropout
    from rlhf_kit.training.hf import load_for_training

    policy = load_for_training(actor, "causal_lm", lora, gradient_checkpointing)
    reference, reference_fn = None, None
    if lora is not None and lora.r > 0:
        reference_fn = policy.disable_adapter
    else:
        reference = AutoModelForCausalLM.from_pretrained(actor).eval().requires_grad_(False).to(device)
    value, rm = load_critic_and_reward_model(
        critic, reward_model, vocab_size=len(tokenizer), gradient_checkpointing=gradient_checkpointing,
        device=device,
    )  # fmt: skip
    for model in (policy, reference):
        if model is not None:
            disable_dropout(model)
    return PPOModels(policy, value, reference, rm, reference_fn)
