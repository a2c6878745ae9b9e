"""Critic-free estimators and loss aggregation: hand-worked values, group layout, the policy-loss KL
term, the update's accumulation with sequence-level aggregation, and critic-free experience."""

import copy
import os
import tempfile

import pytest
import torch

from rlhf_kit.estimators import (
    aggregate_loss,
    broadcast_to_tokens,
    discounted_returns,
    grpo_advantages,
    needs_critic,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_kit.kl import kl_penalty
from rlhf_kit.losses import PPOPolicyLoss
from rlhf_kit.ppo import (
    ExperienceConfig,
    RewardModelScorer,
    UpdateConfig,
    compute_advantages,
    make_experience,
    ppo_update,
    repeat_prompts,
)
from rlhf_kit.rollout import Rollout, RolloutBuffer
from tests.conftest import make_causal_lm, make_reward_model
from tests.gloo import spawn_ranks
from tests.unit.test_ppo import fake_generation


def test_rloo_hand_worked_and_equal_scores():
    adv = rloo_advantages(torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2]), group_size=4)
    torch.testing.assert_close(adv, torch.tensor([1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]))
    # K = 2: each sample's baseline is the other one
    torch.testing.assert_close(rloo_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(torch.zeros(6), 4)


def test_grpo_and_dr_grpo_hand_worked():
    s = torch.tensor([1.0, 0, 0, 0, 5, 5, 5, 5])
    # group mean 0.25, unbiased std 0.5 -> [1.5, -0.5, -0.5, -0.5]; equal scores -> 0 (not 0 / 0)
    torch.testing.assert_close(
        grpo_advantages(s, 4, eps=0.0)[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=0, atol=1e-6
    )
    assert torch.equal(grpo_advantages(s, 4)[4:], torch.zeros(4))
    dr = grpo_advantages(s, 4, scale_by_std=False)
    torch.testing.assert_close(dr, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    # groups are independent: shifting one group's scores leaves the other's advantages alone
    s2 = s.clone()
    s2[4:] = torch.tensor([9.0, 0, 1, 2])
    torch.testing.assert_close(grpo_advantages(s2, 4)[:4], grpo_advantages(s, 4)[:4])


def test_reinforce_pp_returns_and_batch_normalisation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0], [0.5, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ret = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0, 0.0], [1.5, 2.0, 0.0, 0.0]]))
    adv, ret1 = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(ret1[0, :3], torch.tensor([1.0, 1.0, 1.0]))  # gamma 1: the sum to go
    valid = adv[mask.bool()]
    assert valid.mean().abs() < 1e-6 and (valid.var(unbiased=False) - 1).abs() < 1e-4
    assert torch.equal(adv[~mask.bool()], torch.zeros(3))


def test_broadcast_and_aggregations_hand_worked():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(
        broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2, 0], [-1, 0, 0]])
    )
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    assert aggregate_loss(x, mask, "token_mean").item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert aggregate_loss(x, mask, "seq_mean_token_mean").item() == pytest.approx(2.25)  # (1.5 + 3) / 2
    assert aggregate_loss(x, mask, "seq_mean_token_sum", 4).item() == pytest.approx(0.75)  # (3 + 3) / 2 / 4
    with pytest.raises(ValueError, match="positive constant"):
        aggregate_loss(x, mask, "seq_mean_token_sum")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        needs_critic("ppo2")


def test_policy_loss_kl_term_is_k3_against_the_reference():
    g = torch.Generator().manual_seed(0)
    lp, old, ref, adv = (torch.randn(3, 5, generator=g) for _ in range(4))
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    base, _ = PPOPolicyLoss(0.2)(lp, old, adv, mask)
    with_kl, stats = PPOPolicyLoss(0.2, kl_coef=0.1)(lp, old, adv, mask, ref_logprobs=ref)
    k3 = (kl_penalty(lp, ref, "k3") * mask).sum() / mask.sum()
    torch.testing.assert_close(with_kl, base + 0.1 * k3)
    torch.testing.assert_close(stats.ref_kl, k3)
    _, none = PPOPolicyLoss(0.2)(lp, old, adv, mask, ref_logprobs=ref)
    assert none.ref_kl is None
    with pytest.raises(ValueError, match="ref_logprobs"):
        PPOPolicyLoss(0.2, kl_coef=0.1)(lp, old, adv, mask)


def _group_rollout(n_groups=4, k=4, n=5, seed=0):
    """A rollout whose ``scores`` hold the group id, laid out as consecutive groups."""
    g = torch.Generator().manual_seed(seed)
    b = n_groups * k
    mask = (torch.arange(n)[None] < torch.randint(1, n + 1, (b, 1), generator=g)).long()
    seq = torch.randint(3, 100, (b, 3 + n), generator=g)
    am = torch.cat([torch.ones(b, 3, dtype=torch.long), mask], 1)
    z = torch.zeros(b, n)
    gid = torch.arange(n_groups).repeat_interleave(k).float()
    return Rollout(seq, am, mask, z, z, z, z, z, z, gid, torch.ones(b, dtype=torch.bool))


def test_buffer_keeps_groups_whole_under_shuffling():
    buf = RolloutBuffer(seed=3)
    buf.set_data(_group_rollout(n_groups=6, k=4))
    seen = []
    for mb in buf.minibatches(8, epochs=2, group_size=4):
        ids = mb.scores.view(-1, 4)
        assert (ids == ids[:, :1]).all()  # each block of 4 is one whole group
        seen += ids[:, 0].tolist()
    assert sorted(seen) == sorted(list(range(6)) * 2)  # every group once per epoch
    assert seen[:6] != list(range(6))  # and they were shuffled
    # group_size 1 draws the same order as before groups existed
    a, b = RolloutBuffer(seed=5), torch.Generator().manual_seed(5)
    a.set_data(_group_rollout(n_groups=6, k=4))
    order = torch.randperm(24, generator=b)
    assert next(a.minibatches(24)).scores.tolist() == a.data().scores[order].tolist()
    with pytest.raises(ValueError, match="group size 4"):
        next(buf.minibatches(6, group_size=4))
    assert repeat_prompts([[1, 2], [3]], 2) == [[1, 2], [1, 2], [3], [3]]


@pytest.mark.parametrize("est", ["rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_experience_and_advantages(tokenizer, est):
    actor, ref = make_causal_lm(tokenizer, seed=1), make_causal_lm(tokenizer, seed=2)
    rm = make_reward_model(tokenizer, seed=3)
    cfg = ExperienceConfig(advantage_estimator=est, group_size=2)
    r = make_experience(fake_generation(tokenizer), actor, ref, None, RewardModelScorer(rm), cfg)
    assert torch.equal(r.values, torch.zeros_like(r.values))  # no critic, no value pass
    r.scores = torch.tensor([1.0, 1.0, 3.0, 0.0])
    out, stats = compute_advantages(r, 0.0, cfg)
    m = r.response_mask.bool()
    assert torch.equal(out.advantages[~m], torch.zeros(int((~m).sum())))
    if est == "reinforce_pp_baseline":  # the equal-score group's return is 0 (no KL): below the mean
        assert torch.equal(out.rewards[:2], torch.zeros_like(out.rewards[:2]))
        assert out.returns[2, 0] == 1.5 and out.returns[3, 0] == -1.5  # 3 - 1.5, 0 - 1.5 to go
    elif est != "reinforce_pp":  # the first group's scores are equal: zero advantage
        assert torch.equal(out.advantages[:2], torch.zeros_like(out.advantages[:2]))
        expected = {"rloo": 3.0, "grpo": 1.5 / (1.5 * 2**0.5 + 1e-4), "dr_grpo": 1.5}[est]
        assert out.advantages[2, 0].item() == pytest.approx(expected, rel=1e-4)
    assert "values/explained_variance" not in stats
    with pytest.raises(ValueError, match="pass a critic"):
        make_experience(
            fake_generation(tokenizer), actor, ref, None, RewardModelScorer(rm), ExperienceConfig()
        )


def test_kl_in_reward_or_in_loss(tokenizer):
    r = _group_rollout(n_groups=2, k=2)
    r.logprobs = torch.randn(r.logprobs.shape) * r.response_mask
    r.scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    in_reward = ExperienceConfig(advantage_estimator="rloo", group_size=2)
    in_loss = ExperienceConfig(advantage_estimator="rloo", group_size=2, kl_in_loss=True)
    a, _ = compute_advantages(r, 0.5, in_reward)
    b, _ = compute_advantages(r, 0.5, in_loss)
    assert torch.equal(b.advantages[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0]))  # scores only
    seq_kl = (r.logprobs * r.response_mask).sum(-1)  # k1 against a zero reference
    ret = r.scores - 0.5 * seq_kl
    torch.testing.assert_close(a.advantages[:, 0], rloo_advantages(ret, 2))


def _update(actor, rollout, micro, agg):
    buf = RolloutBuffer(seed=0)
    buf.append(rollout)
    loss = PPOPolicyLoss(0.2, aggregation=agg, kl_coef=0.1, norm_constant=6)
    return ppo_update(
        actor, None, torch.optim.AdamW(actor.parameters(), lr=1e-3), None, buf, loss, None,
        UpdateConfig(mini_batch_size=4, micro_batch_size=micro, max_grad_norm=1e9, train_critic=False, group_size=2),
        ExperienceConfig(advantage_estimator="grpo", group_size=2),
    )  # fmt: skip


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_sequence_aggregation_micro_times_accumulation_equivalence(tokenizer, agg):
    actor, ref = make_causal_lm(tokenizer, seed=1), make_causal_lm(tokenizer, seed=2)
    rm = make_reward_model(tokenizer, seed=3)
    cfg = ExperienceConfig(advantage_estimator="grpo", group_size=2)
    r = make_experience(fake_generation(tokenizer), actor, ref, None, RewardModelScorer(rm), cfg)
    r, _ = compute_advantages(r, 0.0, cfg)
    a1, a4 = copy.deepcopy(actor).double(), copy.deepcopy(actor).double()
    s1, s4 = _update(a1, r, 1, agg), _update(a4, r, 4, agg)
    for p1, p4 in zip(a1.parameters(), a4.parameters()):
        torch.testing.assert_close(p1, p4, atol=1e-10, rtol=1e-8)
    assert s1["policy/grad_norm"] == pytest.approx(s4["policy/grad_norm"], rel=1e-9)
    assert "policy/ref_kl" in s1 and "value/loss" not in s1
    assert not torch.allclose(next(a1.parameters()).float(), next(actor.parameters()))


def _two_rank_body(rank: int) -> None:
    import torch.distributed as dist

    from rlhf_kit.ppo import PromptStream

    # the recipe's layout: the stream splits a step's prompts over ranks, then each rank repeats its own
    stream = PromptStream([[i, i + 1] for i in range(10)], seed=0)
    mine_prompts = repeat_prompts(stream.next_batch(4, rank, 2), 3)
    gathered = [None, None]
    dist.all_gather_object(gathered, mine_prompts)
    assert all(g[j] == g[j - j % 3] for g in gathered for j in range(6))  # whole groups on each rank
    assert sorted(p[0] for g in gathered for p in g[::3]) == sorted(
        p[0] for p in PromptStream([[i, i + 1] for i in range(10)], seed=0).next_batch(4)
    )  # together: the step's 4 prompts, once each
    full = _group_rollout(n_groups=4, k=2, seed=1)
    full.scores = torch.randn(8, generator=torch.Generator().manual_seed(2))
    full.logprobs = torch.randn(full.logprobs.shape, generator=torch.Generator().manual_seed(3))
    full.logprobs = full.logprobs * full.response_mask
    mine = full[rank * 4 : (rank + 1) * 4]  # each rank holds whole groups
    for est in ("grpo", "reinforce_pp"):
        cfg = ExperienceConfig(advantage_estimator=est, group_size=2)
        local, _ = compute_advantages(mine, 0.1, cfg)
        # the single-process answer over all 8 samples, computed without the process group
        m = full.response_mask
        rewards = local.rewards.new_zeros(full.response_mask.shape)
        from rlhf_kit.kl import kl_penalty
        from rlhf_kit.rewards import shape_rewards

        rewards = shape_rewards(full.scores, kl_penalty(full.logprobs, full.ref_logprobs) * m, m, 0.1)
        if est == "grpo":
            expected = broadcast_to_tokens(grpo_advantages(rewards.sum(-1), 2), m)
        else:
            ret = discounted_returns(rewards, m)
            mean = ret[m.bool()].mean()
            std = ret[m.bool()].var(unbiased=False).add(1e-8).sqrt()
            expected = (ret - mean) / std * m
        torch.testing.assert_close(
            local.advantages, expected[rank * 4 : (rank + 1) * 4], atol=1e-5, rtol=1e-5
        )


def test_two_gloo_ranks_equal_one_process():
    """Groups stay on their rank (local baselines); REINFORCE++ normalises over both ranks."""
    with tempfile.TemporaryDirectory() as d:
        spawn_ranks(_two_rank_body, os.path.join(d, "store"), world=2)


def test_non_finite_sample_masks_its_whole_group():
    from rlhf_kit.training.guard import NonFiniteGuard

    r = _group_rollout(n_groups=3, k=2)
    r.scores = torch.tensor([1.0, 0.0, float("nan"), 2.0, 0.5, 0.0])
    guard = NonFiniteGuard(max_bad_steps=5)
    masked = guard.drop_samples(r, group_size=2)
    assert masked.response_mask[2:4].sum() == 0 and masked.response_mask[[0, 1, 4, 5]].bool().any(-1).all()
    out, _ = compute_advantages(masked, 0.0, ExperienceConfig(advantage_estimator="rloo", group_size=2))
    assert torch.equal(out.advantages[2:4], torch.zeros_like(out.advantages[2:4]))
    assert out.advantages[0, 0] == 1.0 and out.advantages[4, 0] == 0.5  # other groups untouched
