"""Evaluate a policy: generate on held-out prompts, score, compare with a baseline policy.

The numbers a user reports after PPO: mean reward, the reward model's win rate of the policy over a
baseline (the SFT model) on the same prompts, KL to the reference, and response lengths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.training.run import write_json


@dataclass
class PolicySamples:
    """Generations of one policy on a prompt set; all tensors are on the CPU.

    Attributes:
        prompts / responses: decoded text, one per prompt.
        scores: ``(n,)`` reward-model (or function) scores.
        kl: ``(n,)`` sequence KL to the reference, sum over response tokens of ``logp - ref``
            (``None`` when no reference was given).
        lengths: ``(n,)`` response lengths in tokens.
        finished: ``(n,)`` bool, True where the response ended with EOS / a stop string.
    """

    prompts: list[str]
    responses: list[str]
    scores: torch.Tensor
    kl: torch.Tensor | None
    lengths: torch.Tensor
    finished: torch.Tensor


@torch.no_grad()
def sample_policy(
    backend,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    params,
    scorer: Callable[..., torch.Tensor],
    batch_size: int,
    device: torch.device | str,
    policy: nn.Module | None = None,
    reference: nn.Module | None = None,
    temperature: float = 1.0,
) -> PolicySamples:
    """Generate for ``prompts`` with ``backend``, score them, and (with ``policy`` and ``reference``)
    measure the KL of each response to the reference."""
    from rlhf_kit.data import PromptCollator
    from rlhf_kit.ppo import decode_prompts_and_responses, generate_rollouts

    collate = PromptCollator(tokenizer.pad_token_id)
    out = {k: [] for k in ("prompts", "responses", "scores", "kl", "lengths", "finished")}
    for gen in generate_rollouts(backend, prompts, collate, params, batch_size, device):
        seq, am, rmask, p = gen.sequences, gen.attention_mask, gen.response_mask, gen.prompt_length
        out["scores"].append(scorer(seq, am, prompt_length=p, response_mask=rmask).float().cpu())
        if policy is not None and reference is not None:
            lp = sequence_logprobs(policy, seq, am, p, temperature)
            ref = sequence_logprobs(reference, seq, am, p, temperature)
            out["kl"].append(((lp - ref) * rmask).sum(-1).cpu())
        out["lengths"].append(rmask.sum(-1).cpu())
        out["finished"].append(gen.finished.cpu())
        prompts_text, responses_text = decode_prompts_and_responses(tokenizer, seq, am, p, rmask)
        out["prompts"] += prompts_text
        out["responses"] += responses_text
    return PolicySamples(
        prompts=out["prompts"],
        responses=out["responses"],
        scores=torch.cat(out["scores"]),
        kl=torch.cat(out["kl"]) if out["kl"] else None,
        lengths=torch.cat(out["lengths"]),
        finished=torch.cat(out["finished"]),
    )


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Fraction of prompts where ``scores`` beat ``baseline_scores``; a tie counts one half."""
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"score shapes differ: {tuple(scores.shape)} vs {tuple(baseline_scores.shape)}")
    wins = (scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()
    return float(wins.mean())


def summarize(samples: PolicySamples, baseline: PolicySamples | None = None) -> dict:
    """Summary statistics of a policy's samples (and its win rate over ``baseline``)."""
    s = samples.scores
    out = {
        "num_prompts": len(samples.prompts),
        "reward_mean": float(s.mean()),
        "reward_std": float(s.std()) if s.numel() > 1 else 0.0,
        "response_length_mean": float(samples.lengths.float().mean()),
        "finished_fraction": float(samples.finished.float().mean()),
    }
    if samples.kl is not None:
        out["kl_to_reference_mean"] = float(samples.kl.mean())
    if baseline is not None:
        out["baseline_reward_mean"] = float(baseline.scores.mean())
        out["baseline_response_length_mean"] = float(baseline.lengths.float().mean())
        out["win_rate_vs_baseline"] = win_rate(s, baseline.scores)
    return out


def format_table(summary: dict) -> str:
    """A two-column plain-text table of a summary dict."""
    width = max(len(k) for k in summary)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in summary.items():
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def write_eval(
    output_dir: str | os.PathLike, config: dict, summary: dict, samples: list[dict[str, Any]]
) -> Path:
    """Write ``<output_dir>/eval.json`` (``{"config", "summary", "samples"}``) atomically; returns its path."""
    path = Path(output_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"config": config, "summary": summary, "samples": samples})
    return path
