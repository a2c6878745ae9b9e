"""The compiled backend's packed prefill: the prompts' real tokens in one row give the padded prefill's
tokens, log-probs and KV cache, for every family, compiled or eager, on a real-like bf16 checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, HFBackend, SamplingParams
from rlhf_kit.generation.prefill import packed_multiple, packed_prefill_usable, plan_packed_prefill
from tests.conftest import make_causal_lm, real_like_chat_batch


def _prompts(tok, lengths=(30, 12, 5), seed=0):
    """Left-padded prompts of the given real lengths (random ids that are not the pad id)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), tok.pad_token_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, len(tok), (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def test_plan_places_each_real_token_in_its_padded_slot():
    # rows of 3 and 1 real tokens left padded to 4 in a bucket of 32 (128 slots; packed to the multiple 64)
    plan = plan_packed_prefill([3, 1], 32, 4, cache_len=16, device=torch.device("cpu"))
    assert plan.shape == (64, 64, 4)  # total, longest segment (the filler of 60, rounded), boundaries
    assert plan.gather[:4].tolist() == [1, 2, 3, 7]  # (row 0, cols 1-3), (row 1, col 3) of the flat (2, 4)
    assert plan.rows[:4].tolist() == [0, 0, 0, 1] and plan.slots[:4].tolist() == [1, 2, 3, 3]
    assert plan.kwargs["position_ids"][0, :6].tolist() == [0, 1, 2, 0, 0, 1]  # then the filler from 0
    assert plan.kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 64]
    assert plan.last[:3].tolist() == [2, 3, 0]  # each row's last token; bucket padding rows read index 0
    # the filler's keys and values all go to the first row's last slot, which decoding writes before reading
    assert set(plan.rows[4:].tolist()) == {0} and set(plan.slots[4:].tolist()) == {15}
    assert set(plan.gather[4:].tolist()) == {0}
    # nothing saved: 2 rows of 4 slots are fewer than the 64 the packed row is rounded to
    assert plan_packed_prefill([3, 1], 2, 4, cache_len=16, device=torch.device("cpu")) is None


def test_packed_multiple_is_a_power_of_two_of_an_eighth_of_the_padded_batch():
    assert packed_multiple(64, 128) == 1024  # 8,192 slots: at most 8 packed lengths
    assert packed_multiple(64, 100) == 1024  # 800 rounded up to a power of two
    assert packed_multiple(4, 30) == 64  # never below 64


def test_the_setting_is_checked_and_auto_is_off_without_cuda(left_tokenizer):
    model = make_causal_lm(left_tokenizer, "llama")
    cpu = torch.device("cpu")
    assert packed_prefill_usable("auto", model, cpu, 64) is False
    assert (
        packed_prefill_usable("on", model, cpu, 64) is True
        and packed_prefill_usable("off", model, cpu, 64) is False
    )
    with pytest.raises(ValueError, match="packed_prefill must be"):
        packed_prefill_usable("yes", model, cpu, 64)
    model.config.model_type = "unverified"
    with pytest.raises(ValueError, match="packed_prefill is on, but model type 'unverified'"):
        CompiledBackend(model, max_seq_len=64, packed_prefill="on")


def test_packed_prefill_equals_the_padded_one_for_every_family(left_tokenizer, family):
    """Three prompts of 30, 12 and 5 tokens in a bucket of 4 (one padding row): the packed prefill runs 64
    tokens instead of 120, and greedy tokens, log-probs and every layer's cached keys and values of the
    real slots equal the padded prefill's; a second, shorter batch after it (stale cache slots) too."""
    model = make_causal_lm(left_tokenizer, family, seed=1)
    params = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True)
    padded = CompiledBackend(copy.deepcopy(model), max_batch_size=4, max_seq_len=64, packed_prefill="off")
    packed = CompiledBackend(copy.deepcopy(model), max_batch_size=4, max_seq_len=64, packed_prefill="on")
    for lengths in ((30, 12, 5), (20, 2, 25)):
        ids, mask = _prompts(left_tokenizer, lengths)
        want, got = padded.generate(ids, mask, params), packed.generate(ids, mask, params)
        assert torch.equal(want.sequences, got.sequences)
        assert (want.logprobs - got.logprobs).abs().max() < 1e-5
        assert want.info["prefill_tokens"] == 4 * ids.shape[1] and got.info["prefill_tokens"] == 64
    # the cache after the first batch's prefill: the real slots agree (decoded slots agree by the tokens)
    ids, mask = _prompts(left_tokenizer)
    one = SamplingParams(max_new_tokens=1, greedy=True, ignore_eos=True)
    padded.generate(ids, mask, one), packed.generate(ids, mask, one)
    layers = [(a, b) for a, b in zip(padded._state.modules, packed._state.modules)]
    assert len(layers) == model.config.num_hidden_layers
    for a, b in layers:
        for ka, kb in zip(a._rlhf_kit_kv, b._rlhf_kit_kv):
            for row, n in enumerate((30, 12, 5)):
                real = slice(30 - n, 30)
                assert torch.allclose(ka[row, :, real], kb[row, :, real], atol=1e-5)


def test_packed_prefill_through_the_compiled_blocks_equals_hf(left_tokenizer, family):
    """Compiled (traced whole, ``fullgraph``): the second call's prefill runs packed through the compiled
    blocks and gives HF's greedy tokens and log-probs."""
    model = make_causal_lm(left_tokenizer, family, seed=2)
    ids, mask = _prompts(left_tokenizer, seed=3)
    params = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True)
    want = HFBackend(model, left_tokenizer).generate(ids, mask, params)
    backend = CompiledBackend(
        copy.deepcopy(model), max_batch_size=4, max_seq_len=64, compile=True,
        compile_options={"backend": "eager", "fullgraph": True}, packed_prefill="on",
    )  # fmt: skip
    backend.generate(ids, mask, params)  # allocates the KV buffers (an eager prefill)
    got = backend.generate(ids, mask, params)
    assert got.info["prefill"] == "compiled" and got.info["prefill_tokens"] == 64
    assert torch.equal(want.sequences, got.sequences)
    assert (want.logprobs - got.logprobs).abs().max() < 1e-5


def test_packed_prefill_on_a_real_like_bf16_checkpoint(tmp_path):
    """bf16 weights, pad == EOS in the tokenizer, a config pad id that is not the tokenizer's, attention
    dropout in the config: the packed prefill gives the padded one's greedy tokens and end flags, and
    log-probs within bf16 rounding."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    ids = torch.cat([enc.input_ids] * 8)  # 16 rows: enough padding for packing to save tokens
    mask = torch.cat([enc.attention_mask] * 8)
    padded = CompiledBackend(copy.deepcopy(model), max_seq_len=64, packed_prefill="off")
    packed = CompiledBackend(copy.deepcopy(model), max_seq_len=64, packed_prefill="on")
    want, got = padded.generate(ids, mask, params), packed.generate(ids, mask, params)
    assert got.info["prefill_tokens"] < want.info["prefill_tokens"]
    assert torch.equal(want.sequences, got.sequences) and torch.equal(want.finished, got.finished)
    assert (want.logprobs - got.logprobs).abs().max() < 5e-2


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_auto_packs_on_cuda_in_bf16_and_matches_the_padded_prefill(left_tokenizer, device, monkeypatch):
    """``"auto"``: on CUDA, for models at least PACKED_PREFILL_MIN_HIDDEN wide, the packed prefill runs
    (variable-length flash attention, then the Triton decode kernel) and gives the padded prefill's greedy
    tokens in bf16; elsewhere, and for narrower models, it stays padded."""
    from rlhf_kit.generation import prefill

    model = make_causal_lm(left_tokenizer, "llama", seed=4).to(device, torch.bfloat16)

    def backend(**kw):
        return CompiledBackend(copy.deepcopy(model), max_batch_size=4, max_seq_len=64, compile=False, **kw)

    assert backend().packed_prefill is False  # the default is off
    assert backend(packed_prefill="auto").packed_prefill is False  # narrower than PACKED_PREFILL_MIN_HIDDEN
    monkeypatch.setattr(prefill, "PACKED_PREFILL_MIN_HIDDEN", model.config.hidden_size)
    ids, mask = _prompts(left_tokenizer, (40, 3, 17, 28), seed=5)
    params = SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True)
    auto = backend(packed_prefill="auto")
    padded = backend()
    assert auto.packed_prefill is (device == "cuda")
    want, got = padded.generate(ids, mask, params), auto.generate(ids, mask, params)
    assert got.info["prefill_tokens"] == (128 if device == "cuda" else 160)  # 88 real tokens, in 64s
    assert torch.equal(want.sequences, got.sequences)
    assert (want.logprobs - got.logprobs).abs().max() < 5e-2
