"""Evaluate a policy on held-out prompts: mean reward, win rate over a baseline, KL, lengths.

    python recipes/evaluate.py                          # the PPO recipe's default run, if present
    python recipes/evaluate.py --policy outputs/ppo/final --baseline sft/final \
        --reward-model rm/final --prompts data/hh/test_prompts.jsonl

Writes ``<output-dir>/eval.json`` (summary + per-sample records) and prints the summary.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro


@dataclass
class EvalConfig:
    """Policy evaluation. Every field is a command-line flag."""

    policy: str | None = None
    """Policy to evaluate (HF causal-LM dir). None: <ppo-dir>/final of a default PPO run, made if missing."""
    baseline: str | None = None
    """Baseline policy for the win rate, e.g. the SFT model. None: the policy's reference (<ppo-dir>/init/actor
    for the default run); 'none' skips the comparison."""
    reference: str | None = None
    """Reference for the KL measurement. None: the baseline."""
    reward_model: str | None = None
    """Reward model that judges. None: <ppo-dir>/init/reward_model for the default run."""
    reward_fn: str | None = None
    """'module:function' scoring decoded text instead of a reward model."""
    prompts: str | None = None
    """Prompt file. None: <ppo-dir>/data/test_prompts.jsonl."""
    ppo_dir: str = "outputs/ppo"
    """Where the embedded default looks for (or makes) a PPO run."""
    output_dir: str = "outputs/eval"
    """Folder that eval.json (summary and per-sample records) goes to."""
    num_prompts: int = 32
    """Evaluate on the first N prompts of --prompts (0: all)."""
    batch_size: int = 8
    """Prompts per generation call and per scoring forward pass."""
    max_prompt_length: int = 128
    """Prompts are left-truncated to this many tokens (match the PPO run's --max-prompt-length)."""
    max_new_tokens: int = 24
    """Longest response in tokens, EOS included (match the PPO run's --max-new-tokens)."""
    decoding: Literal["greedy", "sample"] = "greedy"
    """greedy: argmax decoding (deterministic, comparable across policies); sample: --temperature/--top-p."""
    temperature: float = 1.0
    """Sampling temperature, > 0, with --decoding sample (NeMo-Aligner 1.0, TRL 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1] with --decoding sample; 1.0 disables it."""
    seed: int = 0
    """Seed of the sampling with --decoding sample."""


def fill_defaults(cfg: EvalConfig) -> EvalConfig:
    """Point missing paths at the default PPO run, running the PPO recipe's default if it is absent."""
    import dataclasses

    final = os.path.join(cfg.ppo_dir, "final")
    if cfg.policy is None and not os.path.exists(os.path.join(final, "config.json")):
        from recipes.ppo import PPOConfig
        from recipes.ppo import main as ppo_main

        print(f"no policy given and no PPO run in {cfg.ppo_dir}: running the PPO recipe's default first")
        ppo_main(PPOConfig(output_dir=cfg.ppo_dir))
    init = os.path.join(cfg.ppo_dir, "init")
    updates = {}
    if cfg.policy is None:
        updates["policy"] = final
        if cfg.baseline is None:
            updates["baseline"] = os.path.join(init, "actor")
        if cfg.reward_model is None and cfg.reward_fn is None:
            updates["reward_model"] = os.path.join(init, "reward_model")
    if cfg.prompts is None:
        updates["prompts"] = os.path.join(cfg.ppo_dir, "data", "test_prompts.jsonl")
    return dataclasses.replace(cfg, **updates)


def validate(cfg: EvalConfig) -> None:
    from rlhf_kit.training.validate import check_model_path, check_path_exists

    for name in ("policy", "reward_model", "reference"):
        if getattr(cfg, name) is not None:
            check_model_path(getattr(cfg, name))
    if cfg.baseline not in (None, "none"):
        check_model_path(cfg.baseline)
    if cfg.prompts is not None:
        check_path_exists(cfg.prompts, "--prompts")
    if cfg.policy is not None and cfg.reward_model is None and cfg.reward_fn is None:
        raise ValueError("--policy needs --reward-model or --reward-fn to judge it")


def main(cfg: EvalConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from rlhf_kit.data import load_prompts, tokenize_prompts
    from rlhf_kit.data.tokenizer import load_tokenizer, stop_token_ids
    from rlhf_kit.generation.base import SamplingParams
    from rlhf_kit.generation.hf import HFBackend
    from rlhf_kit.models import load_reward_model
    from rlhf_kit.models.loading import quiet_weight_progress_bars
    from rlhf_kit.policy_eval import sample_policy, summarize, write_eval
    from rlhf_kit.ppo import FunctionScorer, RewardModelScorer, load_reward_fn
    from rlhf_kit.training.summary import print_summary

    # 1. Resolve the default run and check every path before loading.
    cfg = fill_defaults(cfg)
    validate(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    quiet_weight_progress_bars()  # transformers' per-file loading bars (RLHF_KIT_HF_PROGRESS=1 keeps them)

    # 2. Models, scorer and prompts.
    tokenizer = load_tokenizer(cfg.policy, padding_side="left")  # pads with EOS if it has no pad token

    def load_lm(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)

    policy = load_lm(cfg.policy)
    baseline = None if cfg.baseline in (None, "none") else load_lm(cfg.baseline)
    reference = load_lm(cfg.reference) if cfg.reference else baseline
    if cfg.reward_fn is not None:
        scorer = FunctionScorer(load_reward_fn(cfg.reward_fn), tokenizer)
    else:
        scorer = RewardModelScorer(load_reward_model(cfg.reward_model, dtype).eval().to(device))
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts:
        prompts = prompts[: cfg.num_prompts]
    ids, _ = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_length)
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        greedy=cfg.decoding == "greedy",
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )

    # 3. Generate and score with the policy, then with the baseline on the same prompts.
    def run(model):
        return sample_policy(
            HFBackend(model, tokenizer), tokenizer, ids, params, scorer, cfg.batch_size, device,
            policy=model, reference=reference, temperature=cfg.temperature,
        )  # fmt: skip

    ours = run(policy)
    base = run(baseline) if baseline is not None else None
    summary = summarize(ours, base)

    # 4. Report: JSON with per-sample records, and a table on stdout.
    records = [
        {"prompt": p, "response": r, "score": float(s), "length": int(n)}
        for p, r, s, n in zip(ours.prompts, ours.responses, ours.scores, ours.lengths)
    ]
    if base is not None:
        for rec, r, s in zip(records, base.responses, base.scores):
            rec.update(baseline_response=r, baseline_score=float(s))
    path = write_eval(cfg.output_dir, asdict(cfg), summary, records)
    print_summary("evaluate", {"eval": path}, summary)
    return summary


if __name__ == "__main__":
    config = tyro.cli(EvalConfig)
    try:
        validate(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main(config)
