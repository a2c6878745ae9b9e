"""The static cache's decode attention: every variant equals a float64 reference of grouped-query
attention (KV heads repeated, masked slots excluded), on fresh random inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, HFBackend, SamplingParams
from rlhf_kit.generation.static_cache import (
    DECODE_ATTENTION,
    grouped_decode_attention,
    resolve_decode_attention,
)
from tests.conftest import make_causal_lm, real_like_chat_batch


def _reference(q, k, v, visible, scale):
    b, kv, g, d = q.shape
    k64 = k.double().repeat_interleave(g, dim=1)  # (b, kv*g, L, d): head i reads KV head i // g
    v64 = v.double().repeat_interleave(g, dim=1)
    scores = q.double().reshape(b, kv * g, 1, d) @ k64.transpose(-1, -2) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v64).reshape(b, kv, g, d)


# the variants of grouped_decode_attention; the Triton kernel is tested in test_decode_kernel.py
GROUPED = ("matmul", "sdpa")


@pytest.mark.parametrize("how", GROUPED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_float64_reference(how, dtype):
    gen = torch.Generator().manual_seed(GROUPED.index(how) + (10 if dtype == torch.bfloat16 else 0))
    b, kv, g, length, d = 3, 2, 4, 37, 16
    q, k, v = (
        torch.randn(*s, generator=gen).to(dtype)
        for s in [(b, kv, g, d), (b, kv, length, d), (b, kv, length, d)]
    )
    visible = torch.rand(b, length, generator=gen) < 0.6
    visible[:, 0] = True
    mask = torch.zeros(b, 1, 1, length, dtype=dtype).masked_fill(
        ~visible[:, None, None, :], torch.finfo(dtype).min
    )
    out = grouped_decode_attention(q, k, v, mask, 0.3, how)
    ref = _reference(q, k, v, visible, 0.3)
    assert out.shape == (b, kv, g, d) and out.dtype == dtype
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    # a masked slot has no influence: change its key and value
    k2, v2 = k.clone(), v.clone()
    k2[~visible[:, None, :, None].expand_as(k)] = 100.0
    v2[~visible[:, None, :, None].expand_as(v)] = -100.0
    assert torch.allclose(
        grouped_decode_attention(q, k2, v2, mask, 0.3, how),
        out,
        atol=1e-6 if dtype == torch.float32 else 1e-2,
    )


@pytest.mark.parametrize("how", DECODE_ATTENTION)
def test_backend_with_each_decode_attention_is_greedy_equal_to_hf(left_tokenizer, how):
    """On CPU the Triton kernel runs in Triton's interpreter (tests/conftest.py), in float32 here."""
    enc = left_tokenizer(
        ["Human: hi\n\nAssistant:", "Human: How do I bake bread?\n\nAssistant:"],
        return_tensors="pt",
        padding=True,
    )
    model = make_causal_lm(left_tokenizer, "llama", seed=3)
    if how == "triton" and torch.cuda.is_available():  # compiled Triton takes CUDA tensors only
        model, enc = model.cuda(), enc.to("cuda")
    params = SamplingParams(max_new_tokens=12, greedy=True, ignore_eos=True)
    want = HFBackend(model, left_tokenizer).generate(enc.input_ids, enc.attention_mask, params)
    backend = CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_attention=how)
    if how != "auto":  # auto: Triton on CUDA, matmul on CPU (test_auto_decode_attention_...)
        assert backend.decode_attention == how
    got = backend.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(want.sequences, got.sequences)
    assert (want.logprobs - got.logprobs).abs().max() < 1e-5
    with pytest.raises(ValueError, match="decode_attention"):
        CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_attention="flash")


def test_auto_decode_attention_picks_triton_only_on_cuda_with_a_fitting_head_size():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_decode_attention("auto", cuda, 64) == "triton"  # Triton is installed with the dev extras
    assert resolve_decode_attention("auto", cuda, 80) == "matmul"  # not a power of two
    assert resolve_decode_attention("auto", cuda, 8) == "matmul"  # below tl.dot's 16
    assert resolve_decode_attention("auto", cpu, 64) == "matmul"
    assert resolve_decode_attention("sdpa", cuda, 64) == "sdpa"
    # asked for by name it stays (CPU tensors then need Triton's interpreter)
    assert resolve_decode_attention("triton", cpu, 64) == "triton"
    with pytest.raises(ValueError, match="power-of-two head size"):
        resolve_decode_attention("triton", cuda, 80)


def test_triton_decode_attention_on_a_real_like_bf16_checkpoint(tmp_path):
    """bf16 weights on disk, pad == EOS in the tokenizer, config pad id 0 (not the tokenizer's), attention
    dropout and sampling settings in generation_config: the kernel (Triton's interpreter on CPU) gives the
    matmul path's greedy tokens and end flags, and log-probs within bf16 rounding."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    if torch.cuda.is_available():  # compiled Triton takes CUDA tensors only
        model, enc = model.cuda(), enc.to("cuda")
    kernel = CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_attention="triton")
    plain = CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_attention="matmul")
    a = kernel.generate(enc.input_ids, enc.attention_mask, params)
    b = plain.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.finished, b.finished)
    assert (a.logprobs - b.logprobs).abs().max() < 5e-2


def test_compiled_prefill_on_a_real_like_bf16_checkpoint(tmp_path):
    """The compiled prefill on the real-like checkpoint (pad == EOS, config pad id not the tokenizer's):
    widened to a multiple of 16 with its EOS as left padding, the prompt gives the eager prefill's greedy
    tokens and end flags, and log-probs within bf16 rounding."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    compiled = CompiledBackend(
        copy.deepcopy(model), max_seq_len=64, compile=True, compile_options={"backend": "eager"}
    )
    eager = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    want = eager.generate(enc.input_ids, enc.attention_mask, params)
    compiled.generate(enc.input_ids, enc.attention_mask, params)  # allocates the KV buffers
    got = compiled.generate(enc.input_ids, enc.attention_mask, params)
    assert got.info["prefill"] == "compiled" and got.info["prefill_width"] > enc.input_ids.shape[1]
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.finished, want.finished)
    assert (got.logprobs - want.logprobs).abs().max() < 5e-2
