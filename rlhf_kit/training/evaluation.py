"""Forward passes and sharded evaluation for reward-model and causal-LM (SFT) training.

Every forward goes through the top-level module so DDP and FSDP2 hooks run. Evaluation splits the
examples across ranks, keeps every rank running the same number of forward passes (FSDP2 forwards
are collective) and gathers the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rlhf_kit.models.reward import reward_scores
from rlhf_kit.models.transfer import batch_to_device
from rlhf_kit.training import dist as D

IGNORE_INDEX = -100


def pair_scores(
    model: nn.Module, batch: dict[str, torch.Tensor], packed: bool | str = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of a pair batch (chosen rows ``[0, b)``, rejected ``[b, 2b)``).

    ``batch``: ``input_ids``, ``attention_mask`` ``(2b, t)``, right padded. Each row is scored at the last
    position of its attention mask (:func:`rlhf_kit.models.reward.reward_scores`), whatever the
    config's pad id; ``packed`` (``"auto"``/``"on"``/``"off"`` or a bool) runs the rows' real tokens end
    to end under variable-length attention (:mod:`rlhf_kit.models.varlen`). Returns
    ``(chosen (b,), rejected (b,))`` in float32.
    """
    scores = reward_scores(model, batch["input_ids"], batch["attention_mask"], packed=packed)
    b = scores.shape[0] // 2
    return scores[:b], scores[b:]


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal-LM loss averages over: labels after the one-position shift that are not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    num_items: float,
    packed: bool | str = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Causal-LM loss of ``batch`` summed over label tokens and divided by ``num_items``.

    Dividing every micro-batch by the token count of the whole (global) batch makes gradient
    accumulation exactly equal to one big batch, whatever the micro-batch split. A packed row
    (``position_ids``, no ``attention_mask``: :class:`~rlhf_kit.data.collators.PackedSFTCollator`) runs
    under variable-length attention where ``packed`` allows it (``"auto"``: on CUDA in bf16/fp16,
    :func:`rlhf_kit.models.varlen.use_packed`); otherwise transformers derives a block-diagonal mask
    from the restarting position ids (dense, quadratic in the row's length).

    With ``device``, ``batch`` is the collator's host batch: it moves to ``device`` here (asynchronously
    from pinned memory on CUDA), and a packed row's boundaries are found from its host position ids, so
    the micro-batch costs the host no wait for the device.
    """
    host = batch
    if device is not None:
        batch = batch_to_device(batch, device)
    if "position_ids" in batch and batch.get("attention_mask") is None:
        from rlhf_kit.models.varlen import packed_attention, packed_row_kwargs, use_packed

        if use_packed(packed, model, batch["input_ids"]):
            row = packed_row_kwargs(host["position_ids"], device=batch["position_ids"].device)
            with packed_attention(model):
                return model(**batch, **row, use_cache=False, num_items_in_batch=num_items).loss
    return model(**batch, use_cache=False, num_items_in_batch=num_items).loss


def _shard_batches(n: int, batch_size: int) -> list[list[int] | None]:
    """This rank's evaluation batches of ``range(n)``; ``None`` pads so that all ranks run equally many."""
    mine = list(range(D.rank(), n, D.world_size()))
    per_rank = math.ceil(n / D.world_size())
    batches: list[list[int] | None] = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    batches += [None] * (math.ceil(per_rank / batch_size) - len(batches))
    return batches


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[list], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device | str,
    loss_fn: Callable | None = None,
    packed: bool | str = False,
) -> dict[str, float]:
    """Reward-model metrics on comparison examples, over all ranks (``packed``: as in :func:`pair_scores`).

    Returns ``loss`` (Bradley-Terry, mean over pairs), ``accuracy`` (chosen > rejected),
    ``chosen_reward``, ``rejected_reward`` (means) and ``reward_mean`` / ``reward_std`` over all
    chosen and rejected scores (the statistics PPO standardises rewards with).
    """
    was_training = model.training
    model.eval()
    scores: list[torch.Tensor] = []  # (2, pairs) per batch, read once at the end
    for idx in _shard_batches(len(examples), batch_size):
        batch = collate([examples[i] for i in (idx or [0])])
        c, r = pair_scores(model, batch_to_device(batch, device), packed)
        if idx is not None:
            scores.append(torch.stack([c.float(), r.float()]))
    model.train(was_training)
    chosen, rejected = torch.cat(scores, 1).tolist() if scores else ([], [])
    parts = D.gather_objects((chosen, rejected))
    c = torch.tensor([x for p in parts for x in p[0]], dtype=torch.float64)
    r = torch.tensor([x for p in parts for x in p[1]], dtype=torch.float64)
    both = torch.cat([c, r])
    out = {
        "loss": float(torch.nn.functional.softplus(r - c).mean()),
        "accuracy": float((c > r).double().mean()),
        "chosen_reward": float(c.mean()),
        "rejected_reward": float(r.mean()),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
        "num_pairs": int(c.numel()),
    }
    if loss_fn is not None:
        out["loss"] = float(loss_fn(c.float(), r.float())[0])
    return out


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[list], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Token-averaged causal-LM loss and perplexity on SFT examples, over all ranks."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0  # total: a device tensor once a batch counts, read once at the end
    for idx in _shard_batches(len(examples), batch_size):
        batch = collate([examples[i] for i in (idx or [0])])
        loss_sum = lm_loss(model, batch, num_items=1.0, device=device)
        if idx is not None:
            total = total + loss_sum.double()
            tokens += count_label_tokens(batch["labels"])  # on the host batch
    model.train(was_training)
    total, tokens = D.all_reduce_sum([float(total), tokens], device=device)
    loss = total / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": int(tokens)}
