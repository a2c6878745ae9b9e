"""Reward models: a plain ``AutoModelForSequenceClassification`` (``num_labels=1``) scored at the
last real token, so checkpoints stay standard HF directories."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification

from rlhf_kit.models.attention import maskless_causal
from rlhf_kit.models.heads import (
    backbone_and_head,
    last_token_index,
    position_ids_from_mask,
    unwrap,
)
from rlhf_kit.models.layout import LeftAlignment, left_alignment

REWARD_STATS_FILE = "reward_stats.json"


def load_reward_model(path: str, torch_dtype: torch.dtype | None = None, **kwargs) -> nn.Module:
    """Load an HF sequence-classification model with one label (a local dir or a hub name).

    ``config.pad_token_id`` may be anything (or unset): :func:`reward_scores` reads the score at the last
    position of the attention mask, never where HF's classifier looks for the pad id. A causal-LM
    checkpoint gets a fresh score head, announced in one line (:mod:`rlhf_kit.models.loading`).
    """
    from functools import partial

    from rlhf_kit.models.loading import is_causal_lm_checkpoint, load_new_score_head

    load = partial(
        AutoModelForSequenceClassification.from_pretrained, path, num_labels=1, dtype=torch_dtype, **kwargs
    )
    if is_causal_lm_checkpoint(path):  # a new score head: one line instead of transformers' load report
        return load_new_score_head(load, path)
    return load()


@contextlib.contextmanager
def _head_output(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Capture the score head's per-token output ``(b, t, labels)`` during a forward of ``model``."""
    _, head = backbone_and_head(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
    config = unwrap(model).config
    saved = config.pad_token_id
    if saved is None:  # HF refuses batches > 1 without a pad id; its own pooling is not used here
        config.pad_token_id = 0
    try:
        yield seen
    finally:
        handle.remove()
        config.pad_token_id = saved


def reward_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    packed: bool | str = False,
    alignment: LeftAlignment | None = None,
) -> torch.Tensor:
    """Score each sequence at its last real token: the last position where ``attention_mask`` is 1.

    Args:
        input_ids, attention_mask: ``(b, t)``, left or right padded (position ids are derived from the
            mask, so left padding does not shift positions).

    Returns:
        ``(b,)`` float32 rewards. A right-padded batch runs without its mask (causal attention is
        then exact for every real token), and so does a left-padded one whose rows' real tokens are
        contiguous, each row moved to the front first (:mod:`rlhf_kit.models.layout`). The call goes
        through the model's own ``forward`` (so FSDP2 / DDP hooks run) and takes the score head's
        per-token output from a forward hook. HF's classifier pools at the last token that differs from
        ``config.pad_token_id``; that is wrong whenever the config's pad id is not the tokenizer's, or
        pad == EOS (SmolLM2, Llama 3: the real last token is then taken for padding), so its pooled
        ``logits`` are not used. ``packed`` (``"auto"``, ``"on"`` or a bool; contiguous rows only): every
        row's real tokens end to end in one sequence instead (:mod:`rlhf_kit.models.varlen`).
        ``alignment``: the mask's :class:`~rlhf_kit.models.layout.LeftAlignment` when the caller has it
        (it saves this call's read of the device).
    """
    from rlhf_kit.models.varlen import packed_attention, packing, use_packed

    la = alignment if alignment is not None else left_alignment(attention_mask)
    if la.contiguous and la.max_shift:  # left-padded rows moved to the front: right padded
        input_ids, attention_mask = la.align(input_ids), la.align(attention_mask)
    if la.contiguous and use_packed(packed, model, input_ids):
        pk = packing(attention_mask.sum(-1), host=la.lengths)
        ids = pk.pack(input_ids)
        with packed_attention(model), _head_output(model) as seen:
            model(input_ids=ids, use_cache=False, **pk.forward_kwargs(ids.device))
        last = (pk.starts + pk.lengths - 1).clamp(min=0).to(seen[-1].device)
        return seen[-1][0, last, 0].float()
    with _head_output(model) as seen:
        if la.contiguous:
            # Real tokens come first in every row, so causal attention alone never lets a real token
            # see a pad: the same scores, with no (b, 1, t, t) mask built and SDPA on its causal path.
            with maskless_causal(model, input_ids.shape[1]):  # and no read of the position ids either
                model(input_ids=input_ids, use_cache=False)
        else:
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
    per_token = seen[-1]  # (b, t, 1)
    if per_token.shape[-1] != 1:
        raise ValueError(f"expected a reward model with num_labels=1, got {per_token.shape[-1]} labels")
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last_token_index(attention_mask).to(per_token.device), 0].float()


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
