"""On-device sampling for the compiled decode step: pure tensor functions of fixed shapes (no host sync),
valid inside a captured CUDA graph, and the static sampling flags that select one captured graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def filter_top_k_top_p(
    scores: torch.Tensor, top_k: torch.Tensor | int, top_p: torch.Tensor | float, use_k: bool, use_p: bool
) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to ``-inf``; ``scores (b, v)`` float32.

    Top-k keeps the ``k`` best tokens; top-p then keeps the smallest set of best tokens whose
    (renormalised) mass reaches ``top_p``, i.e. drops a token when the mass strictly before it is
    ``>= top_p`` (the best token is always kept). Same order and boundary as HF's warpers. ``top_k`` and
    ``top_p`` may be 0-d tensors so a captured graph serves any value.
    """
    if not (use_k or use_p):
        return scores
    sorted_s, idx = scores.sort(dim=-1, descending=True)
    v = scores.shape[-1]
    remove = torch.zeros_like(sorted_s, dtype=torch.bool)
    if use_k:
        remove = torch.arange(v, device=scores.device).expand_as(sorted_s) >= top_k
        sorted_s = sorted_s.masked_fill(remove, float("-inf"))
    if use_p:
        probs = torch.softmax(sorted_s, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        remove = remove | (before >= top_p)
        remove[..., 0] = False
        sorted_s = sorted_s.masked_fill(remove, float("-inf"))
    return torch.empty_like(scores).scatter_(-1, idx, sorted_s)


def sample_from_scores(scores: torch.Tensor, greedy: bool) -> torch.Tensor:
    """``(b,)`` token ids: argmax, or a draw from ``softmax(scores)`` by the race ``argmax(p / E)``,
    ``E ~ Exp(1)`` (one kernel-friendly pass, no CPU sync, valid inside CUDA graphs)."""
    if greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    race = torch.empty_like(probs).exponential_()
    return (probs / race).argmax(dim=-1)


@dataclass(frozen=True)
class _Flags:
    """The static part of a sampling configuration (one compiled step / graph per distinct value)."""

    greedy: bool
    top_k: bool
    top_p: bool
    min_new: bool
    eos: bool
