import functools
import os

import pytest
import torch

from rlhf_kit.advantages import GAE, discounted_cumsum, masked_mean, whiten
from tests.gloo import spawn_ranks


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain per-sample loop, values after the last masked token treated as 0."""
    b, t = rewards.shape
    adv = torch.zeros(b, t)
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for j in reversed(range(n)):
            next_v = values[i, j + 1].item() if j + 1 < n else 0.0
            delta = rewards[i, j].item() + gamma * next_v - values[i, j].item()
            last = delta + gamma * lam * last
            adv[i, j] = last
    return adv


def test_gae_hand_worked_nemo_example():
    adv, ret = GAE(gamma=0.5, lam=0.0)(
        torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.ones(1, 4)
    )
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 0.5, -3.0]]))
    torch.testing.assert_close(ret, adv + torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def test_gae_hand_worked_lambda_one_is_monte_carlo():
    # gamma=1, lam=1: advantage = sum of future rewards - V_t.
    r = torch.tensor([[0.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = GAE(1.0, 1.0)(r, v, torch.ones(1, 3))
    torch.testing.assert_close(adv, torch.tensor([[1.5, 1.0, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 2.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_loop_with_ragged_masks(gamma, lam):
    torch.manual_seed(0)
    b, t = 5, 9
    lengths = torch.tensor([9, 1, 4, 7, 0])
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    rewards, values = torch.randn(b, t), torch.randn(b, t)
    adv, ret = GAE(gamma, lam)(rewards, values, mask)
    expected = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, (expected + values) * mask, atol=1e-5, rtol=1e-5)
    # Garbage beyond the mask must not leak into the result.
    values2 = values + (1 - mask) * 100.0
    adv2, _ = GAE(gamma, lam)(rewards + (1 - mask) * 7, values2, mask)
    torch.testing.assert_close(adv2, adv)


def test_gae_rejects_bad_shapes_and_params():
    with pytest.raises(ValueError, match="shape mismatch"):
        GAE()(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError):
        GAE(gamma=1.5)


def test_whiten_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -50.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(out[mask.bool()], expected)
    assert out[~mask.bool()].abs().sum() == 0
    assert masked_mean(out, mask).abs() < 1e-6
    scaled = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(scaled[mask.bool()], expected + valid.mean())


def _whiten_worker(x_all, mask_all, out_dir, rank):
    # Uneven shards: rank 0 gets 1 row, rank 1 gets 3 rows.
    rows = slice(0, 1) if rank == 0 else slice(1, 4)
    out = whiten(x_all[rows], mask_all[rows])
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_whiten_uses_global_statistics_across_two_gloo_ranks(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(4, 6) * 3 + 2
    mask = (torch.rand(4, 6) > 0.3).long()
    mask[0, 0] = 1
    spawn_ranks(functools.partial(_whiten_worker, x, mask, str(tmp_path)), str(tmp_path / "store"))
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(2)}
    combined = torch.cat([results[0], results[1]])
    torch.testing.assert_close(combined, whiten(x, mask), atol=1e-5, rtol=1e-5)
    # and it differs from per-shard whitening (the test would catch local statistics)
    assert not torch.allclose(results[0], whiten(x[:1], mask[:1]), atol=1e-3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU machine runs both


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("discount", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("t,chunk", [(1, 256), (7, 3), (9, 9), (300, 256), (40, 7)])
def test_discounted_cumsum_matches_the_reverse_loop_across_chunks(discount, t, chunk, device):
    torch.manual_seed(t)
    x = torch.randn(3, t)
    want = torch.zeros(3, t, dtype=torch.float64)
    running = torch.zeros(3, dtype=torch.float64)
    for i in reversed(range(t)):  # y_t = x_t + discount * y_{t+1}
        running = x[:, i].double() + discount * running
        want[:, i] = running
    got = discounted_cumsum(x.to(device), discount, chunk=chunk).cpu()
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
