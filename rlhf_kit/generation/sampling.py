"""On-device sampling for the compiled decode step: pure tensor functions of fixed shapes (no host sync),
valid inside a captured CUDA graph, and the static sampling flags that select one captured graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def sample_into(logits: torch.Tensor, bufs: Any, flags: _Flags) -> None:
    """Sample one token per row from ``logits (b, v)`` into the static buffers of a decode bucket
    (``rlhf_kit.generation.static_cache._Buffers``): token, log-prob and validity at column ``bufs.step``,
    the finished flags and the next input token."""
    scaled = logits.float() / bufs.temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    scores = scaled
    if flags.min_new:
        block = bufs.eos_onehot & (bufs.step < bufs.min_new)
        scores = scores.masked_fill(block, float("-inf"))
    scores = filter_top_k_top_p(scores, bufs.top_k, bufs.top_p, flags.top_k, flags.top_p)
    tok = sample_from_scores(scores, flags.greedy)
    lp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
    done = bufs.finished
    tok = torch.where(done, bufs.pad, tok)
    lp = torch.where(done, torch.zeros_like(lp), lp)
    col = bufs.step.view(1)
    bufs.out_tok.index_copy_(1, col, tok[:, None])
    bufs.out_lp.index_copy_(1, col, lp[:, None])
    bufs.out_valid.index_copy_(1, col, (~done)[:, None])
    if flags.eos:
        bufs.finished.copy_(done | bufs.eos_onehot[tok])
    bufs.tok.copy_(tok[:, None])
