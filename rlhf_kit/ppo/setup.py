"""Setting up a PPO run: the pieces a PPO loop (``recipes/ppo.py``) calls before and around its steps.

The scorer and its score statistics, KL controller, placing the four models (compile,
FSDP2 or accelerate; optimizers and schedules) and the generation backend with its weight sync. Each
is a plain function of explicit arguments, so a loop of one's own can take the same pieces; what a
loop calls during the run (resume, checkpoints, metrics) is in ``rlhf_kit.ppo.run``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch

from rlhf_kit.ppo.models import PPOModels, describe_dtypes
from rlhf_kit.ppo.scorers import FunctionScorer, RewardModelScorer


def load_reward_fn(spec: str) -> Callable:
    """The function named by ``'module:function'`` (for :class:`~rlhf_kit.ppo.FunctionScorer`)."""
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def make_scorer(
    tokenizer,
    *,
    reward_fn: str | None,
    reward_model,
    reward_model_path: str | None,
    remote: bool = False,
    server_stats: dict | None = None,
    standardize: bool = True,
    packed: bool | str = "auto",
):
    """The scorer of a PPO run and the ``{"mean", "std"}`` that standardise its scores (or None).

    ``reward_fn`` (``'module:function'``) scores decoded text, unstandardised; else the reward model
    scores with the statistics saved next to it (``reward_model_path``), or, with ``remote``, the
    critic server scores (the scorer is None) with the statistics it reported (``server_stats``).
    ``packed``: the reward model's padding-free setting (``RewardModelScorer``).
    """
    from rlhf_kit.models import load_reward_stats

    if reward_fn is not None:
        return FunctionScorer(load_reward_fn(reward_fn), tokenizer), None
    scorer = None if remote else RewardModelScorer(reward_model, packed)
    stats = server_stats if remote else load_reward_stats(reward_model_path)
    return scorer, stats if standardize else None


def make_kl_controller(kl_coef: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
    """Ziegler et al.'s adaptive KL controller (arXiv:1909.08593) or a fixed coefficient."""
    from rlhf_kit.kl import AdaptiveKLController, FixedKLController

    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)


def place_ppo_models(
    accelerator, models: PPOModels, actor_optim, critic_optim, **place_kwargs
) -> tuple[PPOModels, object]:
    """:func:`rlhf_kit.training.placement.place_models` for the four models: actor and critic (when held
    locally) trainable with their ``OptimSettings``, reference and reward model frozen. Returns the
    models as placed (prepared or sharded) and the ``PlacedModels`` (optimizers, schedulers, backward)."""
    from rlhf_kit.training.placement import place_models

    trainable = {"actor": (models.actor, actor_optim)}
    if models.critic is not None:  # else it trains in a critic server's job
        trainable["critic"] = (models.critic, critic_optim)
    placed = place_models(accelerator, trainable, [models.reference, models.reward_model], **place_kwargs)
    out = dataclasses.replace(models, actor=placed.models["actor"], critic=placed.models.get("critic"))
    lowbit = place_kwargs.get("optimizer") == "adamw8bit"
    if (place_kwargs.get("master_weights") or lowbit) and out.reference is not None:
        # the actor's parameters are bf16 now (rounded from the fp32 it was loaded in), its buffers (the
        # rotary inv_freq) are not: the reference follows, so both compute alike and the KL is exactly 0
        # before the first update
        from rlhf_kit.models.heads import unwrap

        dtype = next(unwrap(out.actor).parameters()).dtype
        for p in out.reference.parameters():
            p.data = p.data.to(dtype)
    if place_kwargs.get("master_weights") or lowbit:  # the load line showed fp32: trained models are bf16 now
        accelerator.print(
            describe_dtypes(out).replace("models:", "models after placement:", 1)
            + ("; 8-bit AdamW moments" if lowbit else "; fp32 masters")
            + fp8_note(place_kwargs.get("fp8_backward", "off"))
        )
    return out, placed


def fp8_note(mode: str) -> str:
    """The placement line's mention of ``--fp8-backward`` (empty when off)."""
    return {"off": "", "weights": "; FP8 weight gradients", "all": "; FP8 weight and input gradients"}[mode]


def resolve_backend(kind: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"compiled"`` on a CUDA device (static KV cache and CUDA graphs: the fast path, no
    flag needed), ``"hf"`` elsewhere (on CPU the compiled decoder has no graphs to gain from); other
    kinds unchanged."""
    if kind != "auto":
        return kind
    return "compiled" if torch.device(device).type == "cuda" else "hf"


def make_backend(
    kind: str,
    actor,
    tokenizer,
    *,
    actor_path: str,
    accelerator,
    max_batch_size: int,
    max_seq_len: int,
    dynamic: bool = False,
    sharded: bool = False,
):
    """The generation backend (``"hf"``: generate through the trained actor; ``"compiled"``: a dedicated
    inference copy of ``actor_path``, bf16 under bf16 mixed precision, whose one batch bucket is
    ``max_batch_size`` (smaller batches are padded up to it); ``"auto"``: compiled on CUDA, hf
    elsewhere, see :func:`resolve_backend`) and ``sync_weights()``, which streams the trainer's weights
    (FSDP2 shards gathered, LoRA merged) into that copy after a step.

    ``ValueError`` for dynamic dispatch through FSDP-sharded HF generation (sharded generate is
    collective, so ranks cannot take different numbers of batches).
    """
    if kind == "auto":
        kind = resolve_backend(kind, accelerator.device)
    if dynamic and kind == "hf" and sharded:
        raise ValueError(
            "--dynamic-dispatch with FSDP needs --backend compiled (sharded generate is collective)"
        )
    if kind == "compiled":
        from transformers import AutoModelForCausalLM

        from rlhf_kit.generation.compiled import CompiledBackend
        from rlhf_kit.generation.resharding import iter_full_params

        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
        infer = AutoModelForCausalLM.from_pretrained(actor_path, dtype=dtype).to(accelerator.device)
        # One bucket: validation's smaller batches are padded up and replay the rollouts' graph. Decoding
        # is bandwidth-bound, so the padding costs little; a second bucket cost 10 s (warm cache) to 31 s
        # (cold) of compilation and capture on an H200 (docs/benchmarks.md, warm start).
        backend = CompiledBackend(
            infer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, tokenizer=tokenizer,
            batch_buckets=(max_batch_size,),
        )  # fmt: skip
        return backend, lambda: backend.update_weights(iter_full_params(actor))
    from rlhf_kit.generation.hf import HFBackend

    return HFBackend(accelerator.unwrap_model(actor), tokenizer), lambda: None
