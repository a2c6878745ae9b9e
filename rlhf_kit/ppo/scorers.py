"""Scorers for a PPO step: a reward model, or a Python function on decoded text; sample tables.

A scorer is called as ``scorer(sequences (b, p + n), attention_mask (b, p + n), *, prompt_length,
response_mask (b, n))`` and returns ``scores (b,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from rlhf_kit.models.reward import reward_scores
from rlhf_kit.rollout import Rollout


class RewardModelScorer:
    """Scores ``(b, p + n)`` token sequences with an HF reward model at the last real token; ``packed``
    (default ``"auto"``: on CUDA where exact) runs the rows padding-free (``reward_scores``)."""

    def __init__(self, model: nn.Module, packed: bool | str = "auto"):
        self.model = model
        self.packed = packed

    @torch.no_grad()
    def __call__(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, alignment=None, **_
    ) -> torch.Tensor:
        """``alignment``: the batch's ``LeftAlignment`` if the caller has it (saves a read of the device)."""
        return reward_scores(self.model, sequences, attention_mask, packed=self.packed, alignment=alignment)


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


def decode_samples(tokenizer, rollout: Rollout, n: int = 4, prompt_chars: int = 200) -> list[list]:
    """``[prompt tail, response, score]`` rows of the first ``n`` samples, for a log table."""
    r = rollout[:n]
    prompts, responses = decode_prompts_and_responses(
        tokenizer, r.sequences, r.attention_mask, r.prompt_length, r.response_mask
    )
    return [[p[-prompt_chars:], resp, float(s)] for p, resp, s in zip(prompts, responses, r.scores)]
