import math

import pytest
import torch

from rlhf_kit.kl import AdaptiveKLController, FixedKLController, kl_penalty


def test_estimators_by_hand():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    # k3 = exp(ref - lp) - (ref - lp) - 1
    expected = torch.tensor([[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), expected)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_true_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(10), 0)
    q = torch.softmax(torch.randn(10), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    lp, ref = p.log()[samples], q.log()[samples]
    assert abs(kl_penalty(lp, ref, "k1").mean() - true_kl) < 0.02
    assert abs(kl_penalty(lp, ref, "k3").mean() - true_kl) < 0.02
    assert (kl_penalty(lp, ref, "k3") >= 0).all()


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 64)
    assert c.value == 0.05


def test_adaptive_controller_ziegler_update_and_clipping():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=256)  # error = clip(0.5) = 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    c2 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c2.update(current_kl=5.4, n_steps=100)  # error = -0.1
    assert c2.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))
    c3 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c3.load_state_dict(c.state_dict())
    assert c3.value == c.value
