import pytest
import torch

from rlhf_kit.logprobs import (
    entropy_from_logits,
    logprobs_and_entropy,
    logprobs_from_logits,
    sequence_logprobs,
)
from tests.conftest import make_causal_lm


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_matches_full_log_softmax(temperature, chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.bfloat16)
    labels = torch.randint(0, 50, (3, 7))
    full = torch.log_softmax(logits.float() / temperature, -1)
    expected = full.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, temperature, chunk), expected)
    ent = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, temperature, chunk), ent, atol=1e-5, rtol=1e-5)
    lp2, ent2 = logprobs_and_entropy(logits, labels, temperature, chunk)
    torch.testing.assert_close(lp2, expected)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=1e-5)


def test_gradient_flows_and_bad_temperature():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    logprobs_from_logits(logits, labels, 0.5, chunk_size=2).sum().backward()
    ref = logits.detach().clone().requires_grad_()
    torch.log_softmax(ref / 0.5, -1).gather(-1, labels[..., None]).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, 0.0)


def test_sequence_logprobs_left_padding_matches_unpadded(tokenizer, family):
    model = make_causal_lm(tokenizer, family)
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 10))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = tokenizer.pad_token_id, 0
    lp = sequence_logprobs(model, ids, mask, response_start=6, temperature=0.7)
    assert lp.shape == (2, 4)
    with torch.no_grad():
        logits = model(input_ids=ids[:1, 3:]).logits
    ref = torch.log_softmax(logits.float() / 0.7, -1)[0, 2:-1].gather(-1, ids[0, 6:, None]).squeeze(-1)
    torch.testing.assert_close(lp[0], ref, atol=1e-5, rtol=1e-5)
