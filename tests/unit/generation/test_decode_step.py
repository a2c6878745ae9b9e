"""Decode steps as independent row chains (rlhf_kit.generation.decode_step): each row range runs the model and
the sampler on its own (its own stream on CUDA), seeing only its rows of the buffers and the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, SamplingParams
from rlhf_kit.generation.decode_step import RowBuffers, RowState, chains_for, check_chains, row_chains
from rlhf_kit.generation.static_cache import _Buffers, _KVState
from tests.conftest import make_causal_lm, real_like_chat_batch

PROMPTS = [
    "Human: hi\n\nAssistant:",
    "Human: what is a good name for a cat?\n\nAssistant:",
    "Human: how do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: and then?\n\nAssistant:",
    "Human: tell me a joke\n\nAssistant:",
    "Human: why is the sky blue?\n\nAssistant:",
]


def test_row_views_write_into_the_bucket_and_share_its_settings():
    bufs = _Buffers(8, 16, 32, torch.float32, torch.device("cpu"))
    state = _KVState(8, 16, torch.device("cpu"), "matmul")
    chains = row_chains(bufs, state, 3)
    assert [c[0].b for c in chains] == [3, 2, 3]
    assert [c[1].lo for c in chains] == [0, 3, 5]
    rows = chains[1][0]
    rows.out_tok.fill_(7)
    assert torch.equal(bufs.out_tok[3:5], torch.full((2, 16), 7)) and bufs.out_tok[:3].eq(0).all()
    assert rows.step is bufs.step and rows.eos_onehot is bufs.eos_onehot
    module, like = torch.nn.Linear(1, 1), torch.zeros(8, 2, 1, 4)
    k, _ = chains[2][1].buffers(module, like)  # allocates the whole cache once, then gives rows 5:
    full_k, _ = state.buffers(module, like)
    assert k.shape[0] == 3 and k.data_ptr() == full_k[5:].data_ptr()
    assert isinstance(chains[0][0], RowBuffers) and isinstance(chains[0][1], RowState)


def test_how_many_chains_a_bucket_gets():
    bufs = _Buffers(8, 16, 32, torch.float32, torch.device("cpu"))
    state = _KVState(8, 16, torch.device("cpu"), "matmul")
    cache: dict = {}
    assert chains_for(cache, bufs, state, 1) is None  # one chain: the plain step
    assert chains_for(cache, bufs, state, 5) is None  # fewer than two rows per chain
    got = chains_for(cache, bufs, state, 2)
    assert len(got) == 2 and chains_for(cache, bufs, state, 2) is got  # kept per bucket
    with pytest.raises(ValueError, match="decode_chains"):
        check_chains(0, "blocks")
    with pytest.raises(ValueError, match="decode_chains"):
        check_chains(2, "step")
    with pytest.raises(ValueError, match="decode chains"):
        row_chains(bufs, state, 9)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_chains_generate_what_one_chain_generates(left_tokenizer, family):
    """Greedy tokens, their log-probs, finished rows and EOS handling are the same when each half of the
    bucket runs on its own; the second call after sleep() (buffers and chains rebuilt) too."""
    model = make_causal_lm(left_tokenizer, family, seed=2)
    enc = left_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if torch.cuda.is_available():  # compiled, captured, one stream per chain
        model, enc = model.cuda(), enc.to("cuda")
    params = SamplingParams(max_new_tokens=10, greedy=True, min_new_tokens=2)
    one = CompiledBackend(copy.deepcopy(model), max_seq_len=96)
    two = CompiledBackend(copy.deepcopy(model), max_seq_len=96, decode_chains=2)
    want = one.generate(enc.input_ids, enc.attention_mask, params)
    for _ in range(2):
        got = two.generate(enc.input_ids, enc.attention_mask, params)
        assert two._chains and len(two._chains[8]) == 2  # bucket 8: rows 0-3 and 4-7
        assert torch.equal(got.sequences, want.sequences) and torch.equal(got.finished, want.finished)
        assert torch.equal(got.response_mask, want.response_mask)
        assert (got.logprobs - want.logprobs).abs().max() < 1e-5
        two.sleep()
        assert not two._chains


def test_rows_of_the_second_chain_read_their_own_cache_rows(left_tokenizer):
    """A different prompt in one row of the second half changes only that row's tokens."""
    model = make_causal_lm(left_tokenizer, "llama", seed=3)
    model = model.cuda() if torch.cuda.is_available() else model
    params = SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True)
    two = CompiledBackend(copy.deepcopy(model), max_seq_len=96, decode_chains=2)
    enc = left_tokenizer(PROMPTS + PROMPTS[:3], return_tensors="pt", padding=True)
    a = two.generate(enc.input_ids, enc.attention_mask, params).responses
    other = PROMPTS + PROMPTS[:2] + ["Human: a completely different question about boats\n\nAssistant:"]
    enc2 = left_tokenizer(other, return_tensors="pt", padding=True)
    b = two.generate(enc2.input_ids, enc2.attention_mask, params).responses
    assert torch.equal(a[:7], b[:7]) and not torch.equal(a[7], b[7])


def test_a_real_like_bf16_checkpoint_generates_the_same_in_two_chains(tmp_path):
    """bf16 weights, pad == EOS in the tokenizer, a config pad id that differs, attention dropout, EOS stops:
    six rows (three in each chain of bucket 8) give one chain's tokens, ends and log-probs."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    ids, mask = enc.input_ids.repeat(3, 1), enc.attention_mask.repeat(3, 1)
    one = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    two = CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_chains=2)
    a, b = one.generate(ids, mask, params), two.generate(ids, mask, params)
    assert len(two._chains[8]) == 2
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.finished, b.finished)
    assert torch.equal(a.response_mask, b.response_mask)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5
