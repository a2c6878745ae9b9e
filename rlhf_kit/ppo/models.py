"""The four PPO models: loading actor, reference, critic and reward model from HF directories
(placing them on devices, sharding and compiling is ``rlhf_kit.training.placement``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from rlhf_kit.training import dist as D


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
    from rlhf_kit.models import disable_dropout
    from rlhf_kit.training.hf import load_for_training

    policy = load_for_training(actor, "causal_lm", lora, gradient_checkpointing)
    reference, reference_fn = None, None
    if lora is not None and lora.r > 0:
        reference_fn = policy.disable_adapter
    else:
        # a copy of the actor as loaded, in its dtype (fp32), not the checkpoint's: KL to the reference starts
        # at 0, not at bf16 noise (where placement gives the actor bf16 weights, place_ppo_models casts the
        # reference to match); one read of the checkpoint instead of two
        reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    value, rm = load_critic_and_reward_model(
        critic, reward_model, vocab_size=len(tokenizer), gradient_checkpointing=gradient_checkpointing,
        device=device,
    )  # fmt: skip
    for model in (policy, reference):
        if model is not None:
            disable_dropout(model)
    models = PPOModels(policy, value, reference, rm, reference_fn)
    if D.is_main_process():
        print(describe_dtypes(models))
    return models


def describe_dtypes(models: PPOModels) -> str:
    """One line naming each model's parameter dtype and whether it trains (the log of what runs in which
    precision: trainable models in fp32 whatever the checkpoint stores, frozen ones as loaded)."""

    def dtype(m: nn.Module) -> str:
        return str(next(m.parameters()).dtype).removeprefix("torch.")

    parts = [f"actor {dtype(models.actor)} (trainable)"]
    if models.critic is not None:
        parts.append(f"critic {dtype(models.critic)} (trainable)")
    parts.append(
        f"reference {dtype(models.reference)} (frozen)"
        if models.reference is not None
        else "reference = actor without LoRA"
    )
    if models.reward_model is not None:
        parts.append(f"reward model {dtype(models.reward_model)} (frozen)")
    return "models: " + ", ".join(parts)
