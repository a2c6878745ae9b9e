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


@pytest.mark.slow
def test_fused_path_matches_the_chunked_one_with_one_graph_for_every_row_count(monkeypatch):
    """The compiled path (the default on CUDA; forced here on the CPU, through the same Inductor
    compile): log-probs, entropies and the logits' gradient as the chunked float32 loop gives them, for
    two batch shapes, the second without a recompile (the row count is symbolic)."""
    from torch._dynamo.utils import counters

    import rlhf_kit.logprobs as L

    monkeypatch.setattr(L, "_COMPILED", {})
    g = torch.Generator().manual_seed(3)
    counters.clear()
    for shape in ((3, 7), (5, 4)):
        logits = torch.randn(*shape, 50, generator=g).to(torch.bfloat16)
        labels = torch.randint(0, 50, shape, generator=g)
        got = []
        for fused in (False, True):
            monkeypatch.setattr(L, "FUSED", fused)
            x = logits.clone().requires_grad_()
            lp, ent = L.logprobs_and_entropy(x, labels, 0.7, chunk_size=4)
            (lp * 1.5 + ent * 0.3).sum().backward()
            got.append((lp, ent, L.logprobs_from_logits(logits, labels, 0.7, chunk_size=4), x.grad.float()))
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # with and without entropy; each for every row count


def test_fused_path_is_the_default_on_cuda_only(monkeypatch):
    import rlhf_kit.logprobs as L

    monkeypatch.setattr(L, "_COMPILED", {})
    monkeypatch.setattr(L, "FUSED", None)
    assert L._fused(torch.zeros(1)) is None  # CPU logits: the chunked loop
    cuda = type("Logits", (), {"is_cuda": True})()
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    assert L._fused(cuda) is not None and L._fused(cuda) is L._fused(cuda)  # compiled once, then kept
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    monkeypatch.setattr(L, "_COMPILED", {})
    assert L._fused(cuda) is None  # no Triton: no compiled kernels on CUDA either
    monkeypatch.setattr(L, "FUSED", False)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    assert L._fused(cuda) is None


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
