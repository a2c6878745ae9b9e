import pytest
import torch

from rlhf_kit.generation.base import SamplingParams
from rlhf_kit.generation.hf import HFBackend
from rlhf_kit.policy_eval import format_table, sample_policy, summarize, win_rate
from rlhf_kit.ppo import RewardModelScorer
from tests.conftest import make_causal_lm, make_reward_model


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == pytest.approx(
        0.625
    )
    with pytest.raises(ValueError):
        win_rate(torch.zeros(2), torch.zeros(3))


def test_sample_policy_against_itself(tokenizer):
    policy = make_causal_lm(tokenizer, seed=0)
    scorer = RewardModelScorer(make_reward_model(tokenizer, seed=1))
    prompts = [
        tokenizer("User: hello\n\nAssistant:").input_ids,
        tokenizer("User: a much longer question here?\n\nAssistant:").input_ids,
    ]
    params = SamplingParams(
        max_new_tokens=5,
        greedy=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    s = sample_policy(
        HFBackend(policy, tokenizer), tokenizer, prompts, params, scorer, 1, "cpu", policy, policy
    )
    assert len(s.responses) == 2 and s.prompts[0].endswith("Assistant:")
    assert s.kl.abs().max() < 1e-6  # the policy is its own reference
    summary = summarize(s, s)
    assert summary["win_rate_vs_baseline"] == 0.5  # greedy twice: all ties
    assert summary["response_length_mean"] == pytest.approx(float(s.lengths.float().mean()))
    assert "win_rate_vs_baseline" in format_table(summary)
