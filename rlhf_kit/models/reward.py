"""Reward models: a plain ``AutoModelForSequenceClassification`` (``num_labels=1``) scored at the
last real token, so checkpoints stay standard HF directories."""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification

from rlhf_kit.models.heads import position_ids_from_mask

REWARD_STATS_FILE = "reward_stats.json"


def load_reward_model(path: str, torch_dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    """Load an HF sequence-classification model with one label (a local dir or a hub name)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch_dtype, **kwargs
    )
    if model.config.pad_token_id is None:
        raise ValueError(f"{path}: config has no pad_token_id; set one (distinct from EOS) before RM use")
    return model


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score each sequence at its last real token.

    Args:
        input_ids, attention_mask: ``(b, t)``, left or right padded (position ids are derived from the
            mask, so left padding does not shift positions).

    Returns:
        ``(b,)`` float32 rewards. The call goes through the model's own ``forward`` (so FSDP2 / DDP
        hooks run); HF pools at the last token that is not ``config.pad_token_id``, which is the last
        real token because rlhf_kit requires a pad token distinct from every content token and EOS.
    """
    if getattr(model.config, "pad_token_id", None) is None:
        raise ValueError("reward model config has no pad_token_id; set one distinct from EOS")
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.logits[:, 0].float()


def save_reward_stats(path: str, mean: float, std: float, **extra) -> None:
    """Write ``reward_stats.json`` (used to standardise scores in PPO) into a model directory."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, REWARD_STATS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"mean": float(mean), "std": float(std), **extra}, f, indent=2)
    os.replace(tmp, os.path.join(path, REWARD_STATS_FILE))


def load_reward_stats(path: str) -> dict | None:
    """The ``reward_stats.json`` of a model directory, or None if it has none."""
    p = os.path.join(path, REWARD_STATS_FILE)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)
