"""Step 4 of PPO, update: clipped policy and value losses over mini-batches of the rollout, with
token-weighted gradient accumulation over micro-batches; statistics averaged over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from rlhf_kit.estimators import aggregation_units
from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
from rlhf_kit.models.attention import padding_safe_sdpa
from rlhf_kit.models.layout import LeftAlignment, left_alignment
from rlhf_kit.models.transfer import host_tensor
from rlhf_kit.models.value import response_values
from rlhf_kit.ppo.advantages import global_mean
from rlhf_kit.ppo.experience import ExperienceConfig
from rlhf_kit.rollout import (
    Rollout,
    RolloutBuffer,
    length_grouped_micro_batches,
    pack_by_token_budget,
    sample_extents,
)
from rlhf_kit.training.memory_budget import MemoryBudget
from rlhf_kit.training.metrics import scalars_to_floats
from rlhf_kit.training.precision import grad_holder


def _global_count(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all ranks (no-op without a process group)."""
    x = x.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def _over_ranks(x: float, op: dist.ReduceOp, device: torch.device) -> float:
    """``x`` reduced with ``op`` (MIN, MAX) over all ranks; call only with a process group."""
    t = torch.tensor(float(x), device=device)
    dist.all_reduce(t, op=op)
    return t.item()


@dataclass
class UpdateConfig:
    """How one rollout trains the actor and the critic."""

    mini_batch_size: int = 64
    """Samples per optimizer step on this rank (global batch / world size)."""
    micro_batch_size: int = 8
    """Samples per forward/backward; mini_batch_size / micro_batch_size steps of accumulation. The
    mini-batch's samples are sorted by length first, and each micro-batch is trimmed to its own widest
    sample (the accumulated gradient does not depend on the grouping)."""
    micro_batch_tokens: int = 0
    """> 0: instead of fixed micro-batches, the longest samples first, each micro-batch as many samples as
    fit in this many padded tokens (samples x (longest prompt + longest response)), at least one; every
    rank runs as many micro-batches as the rank that needs most (rlhf_kit.rollout.pack_by_token_budget)."""
    ppo_epochs: int = 1
    max_grad_norm: float = 1.0
    train_actor: bool = True
    """False during critic warm-up."""
    train_critic: bool = True
    """False when the critic trains elsewhere (a critic server, ``rlhf_kit.serving``), or when there is
    none (a critic-free estimator): actor-only update."""
    packed: bool | str = "auto"
    """Run the actor's and critic's forward and backward passes padding-free (rlhf_kit.models.varlen);
    ``"auto"`` (or ``"on"``/``"off"``): where that is exact and fast, on CUDA (``varlen.use_packed``)."""
    group_size: int = 1
    """Mini-batches take whole groups of this many consecutive samples (1: samples shuffle freely)."""


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
    clip_grad: Callable[[nn.Module, float], float | torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    budget: MemoryBudget | None = None,
    advantages: Callable[[Rollout], tuple[Rollout, dict]] | None = None,
) -> dict:
    """``ppo_epochs`` passes over the buffer in mini-batches, each one optimizer step per model with
    gradient accumulation over micro-batches.

    Each micro-batch's policy loss is weighted by its share of the mini-batch's aggregation units
    (valid tokens for the token mean, sequences for the sequence means of ``policy_loss.aggregation``;
    counted over all ranks), so the accumulated gradient equals that of one aggregate over the whole
    mini-batch: micro 1 x accumulation 4 gives the same step as micro 4 x accumulation 1.

    The actor trains when ``cfg.train_actor`` and ``actor_opt`` is given; the critic when
    ``cfg.train_critic`` (a critic server runs this function critic-only, the actor job actor-only,
    and the mini-batch order depends only on the buffer's seed, so the split run equals the joint one).
    ``backward`` defaults to ``loss.backward()`` (pass ``accelerator.backward``); ``clip_grad`` to
    ``torch.nn.utils.clip_grad_norm_``. Returns mean statistics over all micro-batches.

    With ``exp_cfg.skip_old_logprobs`` the rollout makes exactly one optimizer step, so each
    micro-batch's forward (before the step) is the old policy: its detached log-probs are the ratio's
    denominator, and ``kl/seq_mean`` (the rollout's KL to the reference, over all ranks) is returned.

    ``budget`` (a :class:`~rlhf_kit.training.memory_budget.MemoryBudget`, token-budget mode only:
    ``cfg.micro_batch_tokens > 0``) replaces ``cfg.micro_batch_tokens``; in the second update that trains
    the actor (critic warm-up updates do not count) it measures the first micro-batch and grows to what the
    device holds, for the mini-batches after it.

    With ``exp_cfg.score_in_update`` the rollout arrives unscored by actor and critic, and ``advantages``
    (e.g. ``functools.partial(compute_advantages, kl_coef=..., cfg=exp_cfg)``) completes it. When the
    rollout is one micro-batch (under a token budget: one whose tokens fit twice, as it holds both
    models' activations at once), its forward passes (before the one optimizer step: the old policy and
    values) are detached into the rollout, ``advantages`` runs, and the losses follow on the same graphs;
    otherwise both models first score the mini-batch without gradients. ``advantages``' statistics
    (``reward/...``, ``kl/seq_mean``, ...) are returned with the update's.
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
    # the default keeps the norm on the device (read with the other statistics at the end)
    clip_grad = clip_grad or (lambda m, n: torch.nn.utils.clip_grad_norm_(m.parameters(), n))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # statistics stay on the device until the end: a float() per micro-batch statistic would wait for
    # the GPU each time and leave it idle while the host launches the next forward
    totals: dict[str, torch.Tensor | float] = {}
    n_micro = 0
    seq_kl: list[torch.Tensor] = []  # (b,) per micro-batch: the rollout's KL, with skip_old_logprobs

    def add(key: str, value: torch.Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
        totals[key] = totals[key] + value if key in totals else value

    agg = getattr(policy_loss, "aggregation", "token_mean")
    scoring = exp_cfg.score_in_update
    reuse = exp_cfg.skip_old_logprobs and train_actor and not scoring
    if scoring and (advantages is None or not (train_actor and train_critic)):
        raise ValueError(
            "ppo_update: score_in_update needs advantages= and trains both actor and critic here"
        )
    if (reuse or scoring) and (cfg.ppo_epochs != 1 or len(buffer) > cfg.mini_batch_size):
        raise ValueError(
            f"ppo_update: {'score_in_update' if scoring else 'skip_old_logprobs'} needs one optimizer step "
            f"per rollout (ppo_epochs 1 and at most mini_batch_size samples); got {cfg.ppo_epochs} epoch(s) "
            f"over {len(buffer)} samples in mini-batches of {cfg.mini_batch_size}"
        )
    adv_stats: dict = {}
    # untrimmed: _micro_batches cuts each micro-batch to its own columns, so a trim would only cost a read
    batches = buffer.minibatches(
        cfg.mini_batch_size, cfg.ppo_epochs, device=device, group_size=cfg.group_size, trim=False
    )
    budgeted = budget is not None and cfg.micro_batch_tokens > 0
    # counted and measured only in updates that train everything this process trains (not a critic
    # warm-up: the actor's activations and optimizer state would be missing from the measurement)
    full = budgeted and (train_actor or actor_opt is None)
    measure = full and budget.wants_measurement()
    trained = [m for m, on in ((actor, train_actor), (critic, train_critic)) if on]
    for mb in batches:
        if train_actor:
            p_tokens = _global_count(aggregation_units(_policy_mask(mb, exp_cfg), agg)).clamp(min=1)
        if train_critic:
            v_tokens = _global_count(mb.response_mask.float().sum()).clamp(min=1)
        tokens = budget.tokens if budgeted else cfg.micro_batch_tokens
        groups, extents = _cut(mb, cfg, tokens)
        # scoring in the update: with the rollout in one micro-batch (the same count on every rank), which
        # holds the actor's and the critic's activations at once, so under a token budget only if twice
        # its tokens fit
        micros = _split(mb, groups, extents) if not scoring or len(groups) == 1 else []
        fused = scoring and len(micros) == 1 and (tokens <= 0 or 2 * micros[0][0].sequences.numel() <= tokens)
        if scoring and world > 1:  # each rank trims its own columns: the path must be the same on all of them
            fused = bool(_over_ranks(fused, dist.ReduceOp.MIN, mb.sequences.device))
        if scoring and not fused:  # the old policy's and values' passes first, then the advantages
            mb, adv_stats = advantages(_score_old(mb, actor, critic, exp_cfg, cfg))
            micros = _split(mb, groups, extents)  # same cut: scoring changed no length
        for micro, align in micros:
            size = micro.sequences.numel() * (2 if fused else 1)  # fused: both models' activations per token
            watch = budget.measure(size, _trained_params(trained)) if measure else nullcontext()
            measure = False  # one micro-batch is measured
            # cuDNN's SDPA backward is NaN on the left-padding rows: see rlhf_kit.models.attention
            with padding_safe_sdpa(), watch:
                p = micro.prompt_length
                args = (micro.sequences, micro.attention_mask, p)
                if fused:  # these passes are the old policy's and values: score, then the advantages
                    lp, ent = sequence_logprobs(actor, *args, exp_cfg.temperature, with_entropy=True,
                                                alignment=align, packed=cfg.packed)  # fmt: skip
                    values = response_values(critic, *args, alignment=align, packed=cfg.packed)
                    m = micro.response_mask.float()
                    micro, adv_stats = advantages(
                        replace(micro, logprobs=lp.detach() * m, values=values.detach() * m)
                    )
                if train_actor:
                    pm = _policy_mask(micro, exp_cfg)
                    if not fused:
                        lp, ent = sequence_logprobs(actor, *args, exp_cfg.temperature, with_entropy=True,
                                                    alignment=align, packed=cfg.packed)  # fmt: skip
                    # one optimizer step per rollout: the weights are still the old policy's here
                    old = lp.detach() if reuse else micro.logprobs
                    loss, ps = policy_loss(lp, old, micro.advantages, pm, ent, micro.ref_logprobs)
                    if reuse:  # the rollout's KL to the reference, which scoring did not compute
                        seq_kl.append(((old - micro.ref_logprobs) * micro.response_mask).sum(-1))
                    backward(loss * (aggregation_units(pm, agg) * world / p_tokens))
                    add("policy/loss", ps.loss)
                    add("policy/clip_fraction", ps.clip_fraction)
                    add("policy/approx_kl", ps.approx_kl)
                    add("policy/ratio_mean", ps.ratio_mean)
                    add("policy/entropy", ps.entropy)
                    if ps.ref_kl is not None:
                        add("policy/ref_kl", ps.ref_kl)
                if train_critic:
                    vm = micro.response_mask.float()
                    if not fused:
                        values = response_values(critic, *args, alignment=align, packed=cfg.packed)
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
    steps = max(float(totals.pop("_steps", 1)), 1)
    out = {}
    read = scalars_to_floats(totals | adv_stats)  # one read: scoring's statistics came as device tensors
    for k, v in read.items():
        if k in adv_stats:
            continue
        out[k] = v / (steps if k.endswith("grad_norm") else max(n_micro, 1))
    if budgeted:  # the budget the next update cuts its micro-batches by
        if full:
            budget.update_done()
        out["batch/micro_batch_tokens"] = budget.tokens
    if reuse:  # the mean over every rank's sequences, as compute_advantages reports it otherwise
        out["kl/seq_mean"] = global_mean(torch.cat(seq_kl) if seq_kl else torch.zeros(0, device=device))
    return out | {k: read[k] for k in adv_stats}


@torch.no_grad()
def _score_old(
    mb: Rollout, actor: nn.Module, critic: nn.Module, exp_cfg: ExperienceConfig, cfg: UpdateConfig
) -> Rollout:
    """``mb`` with the old policy's log-probs and the critic's values, in scoring's micro-batches."""
    lps, vals = [], []
    p, n = mb.prompt_length, exp_cfg.micro_batch_size
    for s in range(0, mb.sequences.shape[0], n):
        seq, am = mb.sequences[s : s + n], mb.attention_mask[s : s + n]
        la = left_alignment(am)
        lps.append(sequence_logprobs(actor, seq, am, p, exp_cfg.temperature, alignment=la, packed=cfg.packed))
        vals.append(response_values(critic, seq, am, p, alignment=la, packed=cfg.packed))
    m = mb.response_mask.float()
    return replace(mb, logprobs=torch.cat(lps) * m, values=torch.cat(vals) * m)


def _trained_params(models: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in models for p in m.parameters() if p.requires_grad]


def _micro_batches(
    mb: Rollout, cfg: UpdateConfig, tokens: int | None = None
) -> list[tuple[Rollout, LeftAlignment]]:
    """The mini-batch cut by length (:func:`rlhf_kit.rollout.length_grouped_micro_batches`): fixed
    sizes over the samples sorted longest first, or a token budget with the same count on every rank.
    Each micro-batch comes with its rows' left padding (:class:`rlhf_kit.models.layout.LeftAlignment`),
    known from the one read of the lengths, so its forward passes need no read of their own."""
    return _split(mb, *_cut(mb, cfg, tokens))


def _cut(mb: Rollout, cfg: UpdateConfig, tokens: int | None = None) -> tuple[list[list[int]], tuple]:
    """:func:`_micro_batches`' sample indices per micro-batch, with the extents read to find them."""
    extents = firsts, lasts, _, _ = sample_extents(mb)  # one read of the lengths per mini-batch
    prompts = [mb.prompt_length - f for f in firsts]
    tokens = cfg.micro_batch_tokens if tokens is None else tokens
    if tokens <= 0:
        order = sorted(range(len(prompts)), key=lambda i: (-(prompts[i] + lasts[i]), i))
        step = cfg.micro_batch_size
        return [order[s : s + step] for s in range(0, len(order), step)], extents
    groups = pack_by_token_budget(prompts, lasts, tokens)
    if dist.is_available() and dist.is_initialized():  # FSDP2: every rank the same number of passes
        most = int(_over_ranks(len(groups), dist.ReduceOp.MAX, mb.sequences.device))
        if most > len(groups):  # this rank needs fewer: cut again into as many as the most
            groups = pack_by_token_budget(prompts, lasts, tokens, most)
    return groups, extents


def _split(mb: Rollout, groups: list[list[int]], extents: tuple) -> list[tuple[Rollout, LeftAlignment]]:
    """The micro-batches of :func:`_cut`'s ``groups``, each with its rows' left padding."""
    firsts, _, runs, lengths = extents
    out = []
    for group, micro in zip(groups, length_grouped_micro_batches(mb, groups, extents)):
        base = min(firsts[i] for i in group)
        shifts = [firsts[i] - base for i in group]
        device = micro.sequences.device
        align = LeftAlignment(  # with the rows' real-token counts: a packed pass reads nothing either
            host_tensor(shifts, device, torch.long),
            max(shifts),
            all(runs[i] for i in group),
            tuple(lengths[i] for i in group),
        )
        out.append((micro, align))
    return out


def _policy_mask(r: Rollout, cfg: ExperienceConfig) -> torch.Tensor:
    """Tokens that take policy gradient: the response, minus unfinished responses if configured."""
    mask = r.response_mask.float()
    if cfg.mask_truncated_responses:
        mask = mask * r.finished.float()[:, None]
    return mask


def mean_over_ranks(stats: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average scalar statistics over data-parallel ranks (one all-reduce; identity on one process).

    Each rank's statistic is already a mean over its own samples; ranks hold equal sample counts.
    """
    from rlhf_kit.training.dist import all_reduce_sum, world_size

    keys = sorted(stats)
    sums = all_reduce_sum([float(stats[k]) for k in keys], device)
    return {k: v / world_size() for k, v in zip(keys, sums)}
