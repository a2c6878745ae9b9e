import pytest
import torch

from rlhf_kit.models.heads import last_token_index
from rlhf_kit.rewards import penalize_missing_eos, shape_rewards, standardize_scores


def test_shape_rewards_places_score_on_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    r = shape_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15, -0.2 + 2.0], [-0.5, -0.5 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


def test_empty_response_gets_no_score_and_last_index():
    mask = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 1]])
    assert last_token_index(mask).tolist() == [0, 0, 2]
    r = shape_rewards(torch.tensor([5.0, 1.0, 2.0]), torch.zeros(3, 3), mask, 0.1)
    assert r[0].abs().sum() == 0 and r[1, 0] == 1.0 and r[2, 2] == 2.0


def test_missing_eos_penalty_and_standardisation():
    s = torch.tensor([1.0, 2.0])
    fin = torch.tensor([True, False])
    assert penalize_missing_eos(s, fin, 1.5).tolist() == [1.0, 0.5]
    assert penalize_missing_eos(s, fin, -1.0, replace=True).tolist() == [1.0, -1.0]
    assert penalize_missing_eos(s, fin, None) is s
    torch.testing.assert_close(standardize_scores(s, 1.0, 2.0), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError):
        standardize_scores(s, 0.0, 0.0)
