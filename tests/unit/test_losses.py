import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_kit.losses import PairwiseRewardLoss, PPOPolicyLoss, ValueLoss, explained_variance


def test_pairwise_loss_by_hand_and_ties_count_as_wrong():
    rc = torch.tensor([2.0, 0.0, 1.0])
    rr = torch.tensor([1.0, 0.0, 3.0])
    loss, stats = PairwiseRewardLoss()(rc, rr)
    expected = (
        -(
            F.logsigmoid(torch.tensor(1.0))
            + F.logsigmoid(torch.tensor(0.0))
            + F.logsigmoid(torch.tensor(-2.0))
        )
        / 3
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats.accuracy.item() == pytest.approx(1 / 3)  # the tie is wrong
    assert stats.chosen_mean.item() == pytest.approx(1.0)
    assert stats.rejected_mean.item() == pytest.approx(4 / 3)


def test_pairwise_margin_and_centering():
    rc, rr = torch.tensor([1.0]), torch.tensor([0.5])
    loss, _ = PairwiseRewardLoss(margin=0.25, center_coef=0.01)(rc, rr)
    expected = -math.log(1 / (1 + math.exp(-0.25))) + 0.01 * 1.5**2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss_pp, _ = PairwiseRewardLoss()(rc, rr, margin=torch.tensor([0.25]))
    assert loss_pp.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.25))), rel=1e-6)


def test_pairwise_gradient_pushes_chosen_up():
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    loss, _ = PairwiseRewardLoss()(rc, rr)
    loss.backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = PPOPolicyLoss(ratio_eps=0.2)(lp, old, adv, mask)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-5)
    assert stats.clip_fraction.item() == pytest.approx(1 / 3)
    assert stats.ratio_mean.item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, rel=1e-5)


def test_policy_loss_gradient_zero_where_clipped_and_ignores_mask():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.9, 0.5, 1.0]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, _ = PPOPolicyLoss(0.2)(lp, old, adv, mask)
    loss.backward()
    g = lp.grad[0]
    assert g[0] == 0  # ratio 1.5 > 1.2 with A > 0: clipped
    assert g[2] == 0  # ratio 0.5 < 0.8 with A < 0: clipped
    assert g[1] == pytest.approx(-0.9 / 3, rel=1e-5)  # d(-A r)/dlogp = -A r / n
    assert g[3] == 0  # masked


def test_policy_loss_entropy_bonus():
    lp = torch.zeros(1, 2)
    ent = torch.tensor([[1.0, 3.0]])
    loss, stats = PPOPolicyLoss(0.2, entropy_coef=0.1)(lp, lp, torch.zeros(1, 2), torch.ones(1, 2), ent)
    assert loss.item() == pytest.approx(-0.2)
    assert stats.entropy.item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        PPOPolicyLoss(0.2, entropy_coef=0.1)(lp, lp, torch.zeros(1, 2), torch.ones(1, 2))


def test_value_loss_clipping_by_hand_and_gradient():
    old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1]], requires_grad=True)
    ret = torch.tensor([[2.0, 1.0]])
    loss, stats = ValueLoss(value_clip=0.2)(v, old, ret, torch.ones(1, 2))
    # token 0: (1-2)^2=1 vs (0.2-2)^2=3.24 -> 3.24 (clipped branch, no grad); token 1: 0.81 vs 0.81
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.81) / 2, rel=1e-5)
    loss.backward()
    assert v.grad[0, 0] == 0
    assert v.grad[0, 1].item() == pytest.approx(0.5 * 2 * (0.1 - 1.0) / 2, rel=1e-5)
    assert stats.clip_fraction.item() == pytest.approx(0.5)
    plain, _ = ValueLoss(value_clip=0.0)(v, old, ret, torch.ones(1, 2))
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.81) / 2, rel=1e-5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_arguments_named_like_the_flags_with_deprecated_aliases():
    assert PPOPolicyLoss(ratio_eps=0.3).ratio_eps == 0.3 and ValueLoss(value_clip=0.4).value_clip == 0.4
    with pytest.warns(DeprecationWarning, match="ratio_eps"):
        assert PPOPolicyLoss(clip_eps=0.3).ratio_eps == 0.3
    with pytest.warns(DeprecationWarning, match="value_clip"):
        assert ValueLoss(clip=0.4).value_clip == 0.4
