"""``ExperienceConfig.skip_old_logprobs``: when a rollout makes one optimizer step, scoring skips the
actor's forward pass and the update's forward supplies the old log-probs. Same weights and the same
KL statistic as recomputing them; refused where it would be wrong; switched on by the recipe's wiring
only where it is exact."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from rlhf_kit.losses import PPOPolicyLoss
from rlhf_kit.ppo import (
    ExperienceConfig,
    RewardModelScorer,
    UpdateConfig,
    compute_advantages,
    make_experience,
    ppo_update,
)
from rlhf_kit.ppo.wiring import experience_config, one_step_on_policy
from rlhf_kit.rollout import RolloutBuffer
from tests.conftest import make_causal_lm, make_reward_model
from tests.unit.test_ppo import fake_generation

GRPO = ExperienceConfig(advantage_estimator="grpo", group_size=2, kl_in_loss=True)
SKIP = dataclasses.replace(GRPO, skip_old_logprobs=True)


def _models(tokenizer):
    actor = make_causal_lm(tokenizer, seed=1).double()
    ref = make_causal_lm(tokenizer, seed=2).double()
    rm = make_reward_model(tokenizer, seed=3).double()
    return actor, ref, RewardModelScorer(rm)


def _update(actor, rollout, exp_cfg, epochs=1, mini=4):
    buf = RolloutBuffer(seed=0)
    buf.append(rollout)
    loss = PPOPolicyLoss(0.2, aggregation="seq_mean_token_mean", kl_coef=0.05)
    cfg = UpdateConfig(
        mini_batch_size=mini, micro_batch_size=2, ppo_epochs=epochs, train_critic=False, group_size=2
    )
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-2)
    return ppo_update(actor, None, opt, None, buf, loss, None, cfg, exp_cfg)


def test_skipping_equals_recomputing(tokenizer):
    actor, ref, scorer = _models(tokenizer)
    gen = fake_generation(tokenizer)
    calls = []
    hook = actor.register_forward_hook(lambda *a: calls.append(1))
    full, full_stats = compute_advantages(make_experience(gen, actor, ref, None, scorer, GRPO), 0.05, GRPO)
    n_full = len(calls)
    skip, skip_stats = compute_advantages(make_experience(gen, actor, ref, None, scorer, SKIP), 0.05, SKIP)
    hook.remove()
    assert n_full > 0 and len(calls) == n_full  # the skipping pass never ran the actor
    torch.testing.assert_close(skip.advantages, full.advantages, rtol=0, atol=0)  # no KL in the reward
    assert torch.equal(skip.logprobs, skip.ref_logprobs)  # the zero-KL placeholder
    assert "kl/seq_mean" in full_stats and "kl/seq_mean" not in skip_stats

    a_full, a_skip = copy.deepcopy(actor), copy.deepcopy(actor)
    s_full, s_skip = _update(a_full, full, GRPO), _update(a_skip, skip, SKIP)
    for p_full, p_skip in zip(a_full.parameters(), a_skip.parameters()):
        torch.testing.assert_close(p_skip, p_full, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(next(a_skip.parameters()), next(actor.parameters()))  # it did train
    assert s_skip["kl/seq_mean"] == pytest.approx(full_stats["kl/seq_mean"], rel=1e-9)
    assert abs(s_skip["kl/seq_mean"]) > 1e-3  # actor and reference differ: a real KL, not the placeholder's 0
    assert s_skip["policy/ratio_mean"] == 1.0 and s_skip["policy/clip_fraction"] == 0.0
    assert s_skip["policy/loss"] == pytest.approx(s_full["policy/loss"], rel=1e-9)


def test_refused_where_it_is_not_exact(tokenizer):
    actor, ref, scorer = _models(tokenizer)
    r, _ = compute_advantages(
        make_experience(fake_generation(tokenizer), actor, ref, None, scorer, SKIP), 0.0, SKIP
    )
    with pytest.raises(ValueError, match="one optimizer step per rollout"):
        _update(copy.deepcopy(actor), r, SKIP, epochs=2)
    with pytest.raises(ValueError, match="one optimizer step per rollout"):
        _update(copy.deepcopy(actor), r, SKIP, mini=2)
    in_reward = dataclasses.replace(SKIP, kl_in_loss=False)
    with pytest.raises(ValueError, match="KL penalty in the reward"):
        compute_advantages(r, 0.1, in_reward)
    compute_advantages(r, 0.0, in_reward)  # a zero coefficient has nothing to compute


def _flat(**kw):
    base = dict(ppo_epochs=1, num_rollout_samples=4, samples_per_prompt=2, global_batch_size=8,
                kl_in_loss=True, kl_coef=0.02, adaptive_kl=False, critic_warmup_steps=0)  # fmt: skip
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize(
    "kw,expected",
    [
        ({}, True),  # GRPO's usual setting: one epoch, the rollout is one global batch, KL in the loss
        ({"kl_in_loss": False, "kl_coef": 0.0}, True),
        ({"kl_in_loss": False}, False),  # the reward's KL penalty needs the old log-probs
        ({"kl_in_loss": False, "kl_coef": 0.0, "adaptive_kl": True}, False),
        ({"ppo_epochs": 2}, False),
        ({"global_batch_size": 4}, False),  # two optimizer steps per rollout
        ({"critic_warmup_steps": 1}, False),
    ],
)
def test_the_recipe_wiring_switches_it_on_only_where_exact(kw, expected):
    assert one_step_on_policy(_flat(**kw)) is expected


def test_experience_config_carries_it():
    flat = _flat(temperature=1.0, kl_estimator="k1", gamma=1.0, lam=0.95, normalize_advantages=True,
                 missing_eos_penalty=None, rollout_micro_batch_size=4, advantage_estimator="grpo")  # fmt: skip
    assert experience_config(flat, None).skip_old_logprobs
    assert not experience_config(SimpleNamespace(**(vars(flat) | {"ppo_epochs": 2})), None).skip_old_logprobs
    assert experience_config(flat, None).old_logprobs == "recompute"  # a loop of one's own without the field
    sampler = SimpleNamespace(**(vars(flat) | {"old_logprobs": "sampler"}))
    assert experience_config(sampler, None).old_logprobs == "sampler"
    # GAE with the KL in the loss: scoring in the update (on CUDA) covers the skip, which would leave the
    # rollout without its kl/seq_mean statistic
    gae = SimpleNamespace(**(vars(flat) | {"advantage_estimator": "gae", "samples_per_prompt": 1,
                                           "num_rollout_samples": 8, "critic_server": None, "score_in_update": "auto",
                                           "old_logprobs": "recompute"}))  # fmt: skip
    on_gpu, on_cpu = experience_config(gae, None, "cuda"), experience_config(gae, None, "cpu")
    assert on_gpu.score_in_update and not on_gpu.skip_old_logprobs
    assert on_cpu.skip_old_logprobs and not on_cpu.score_in_update


def _two_rank_body(rank: int) -> None:
    """Each rank scores and updates its own half; the update's kl/seq_mean is the mean over both."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(1)
    actor = AutoModelForCausalLM.from_config(cfg).double().eval()
    torch.manual_seed(2)
    ref = AutoModelForCausalLM.from_config(cfg).double().eval()
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    gen = fake_generation(tok, seed=rank)  # a different half on each rank
    scorer = lambda seq, am, prompt_length, response_mask: torch.zeros(seq.shape[0])  # noqa: E731
    full = make_experience(gen, actor, ref, None, scorer, GRPO)
    seq_kl = ((full.logprobs - full.ref_logprobs) * full.response_mask).sum(-1)
    both = [None, None]
    dist.all_gather_object(both, seq_kl.tolist())
    expected = sum(sum(b) for b in both) / sum(len(b) for b in both)
    skip, _ = compute_advantages(make_experience(gen, actor, ref, None, scorer, SKIP), 0.0, SKIP)
    stats = _update(copy.deepcopy(actor), skip, SKIP)
    assert stats["kl/seq_mean"] == pytest.approx(expected, rel=1e-9), (rank, stats["kl/seq_mean"], expected)
    assert abs(expected - sum(both[rank]) / len(both[rank])) > 1e-6  # the ranks' own means differ


def test_the_kl_statistic_is_the_mean_over_ranks():
    import os
    import tempfile

    from tests.gloo import spawn_ranks

    with tempfile.TemporaryDirectory() as d:
        spawn_ranks(_two_rank_body, os.path.join(d, "store"), world=2)
