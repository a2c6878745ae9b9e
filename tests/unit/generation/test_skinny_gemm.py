"""The Triton product for few rows (rlhf_kit.generation.skinny_gemm) against a float64 reference, and the
fused decode blocks routed through it.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py); on a CUDA
machine the same tests run the compiled kernel on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, SamplingParams, skinny_gemm
from tests.conftest import make_causal_lm, real_like_chat_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lead, n, k, config",
    [
        ((64,), 96, 512, {}),  # the default tiles: three programs over N, two K steps
        ((2, 1), 70, 300, {"SPLIT_K": 2, "BLOCK_K": 128}),  # N and K not multiples of the tiles, split K
        ((3,), 33, 64, {"BLOCK_N": 16, "BLOCK_K": 32}),
        ((17,), 128, 1024, {"SPLIT_K": 4, "BLOCK_K": 128}),  # 17 rows: a 32-row tile, 15 rows masked
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float64_reference(lead, n, k, config, bias, dtype):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(*lead, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    want = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
    cast = [t.to(dtype).to(DEVICE) if t is not None else None for t in (x, w, b)]
    got = skinny_gemm.linear(*cast, config=config)
    assert got.shape == (*lead, n) and got.dtype == dtype
    # float32 to float32 rounding of the sums; bf16 inputs: the output rounded to bf16 (|y| < ~5)
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    assert torch.allclose(got.double().cpu(), want, atol=tol, rtol=tol)
    # the split's float32 partials add up to the same as one pass (to float32 rounding)
    one = skinny_gemm.linear(*cast, config={**config, "SPLIT_K": 1})
    assert torch.allclose(got.float(), one.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_glu_gives_silu_of_gate_times_up(dtype, bias):
    """``glu=True``: w is gate and up stacked; one pass gives silu(x Wg^T + bg) * (x Wu^T + bu), also
    with a SPLIT_K setting (which GLU ignores: the activation needs whole sums)."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 96, generator=gen), torch.randn(2 * 40, 96, generator=gen) / 96**0.5
    b = torch.randn(80, generator=gen) if bias else None
    full = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
    want = torch.nn.functional.silu(full[:, :40]) * full[:, 40:]
    cast = [t.to(dtype).to(DEVICE) if t is not None else None for t in (x, w, b)]
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    for config in ({}, {"SPLIT_K": 2, "BLOCK_K": 32, "BLOCK_N": 16}):
        got = skinny_gemm.linear(*cast, config=config, glu=True)
        assert got.shape == (5, 40) and got.dtype == dtype
        assert torch.allclose(got.double().cpu(), want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="even row count"):
        skinny_gemm.linear(cast[0], cast[1][:79], glu=True)


def test_unsupported_inputs_are_refused_and_project_falls_back(monkeypatch):
    w = torch.randn(8, 16, device=DEVICE)
    many = torch.randn(skinny_gemm.MAX_ROWS + 1, 16, device=DEVICE)
    assert not skinny_gemm.supported(many, w)
    with pytest.raises(ValueError, match="unsupported input"):
        skinny_gemm.linear(many, w)
    assert not skinny_gemm.supported(torch.randn(4, 16, device=DEVICE).t().contiguous().t(), w.t()[:8])
    calls = []
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda *a: calls.append(a) or torch.zeros(1))
    monkeypatch.setitem(skinny_gemm.CONFIG, "ENABLED", True)
    out = skinny_gemm.project(many, w)  # too many rows: F.linear, not the kernel
    assert not calls and torch.allclose(out, many @ w.t())
    skinny_gemm.project(many[:4], w)
    assert len(calls) == 1
    monkeypatch.setitem(skinny_gemm.CONFIG, "ENABLED", "auto")  # auto: CUDA tensors only
    skinny_gemm.project(many[:4].cpu(), w.cpu())
    assert len(calls) == 1


@pytest.mark.parametrize(
    "family, act",
    [("llama", "silu"), ("qwen2", "silu"), ("llama", "gelu")],  # qwen2: QKV biases; gelu: no GLU pass
)
def test_decode_through_the_skinny_products_matches_the_default(left_tokenizer, family, act, monkeypatch):
    """Greedy generation with the fused blocks' products routed through the kernel (float32: the same
    sums up to rounding) gives the default path's tokens and log-probs; the MLP's gate/up and SiLU run
    as one GLU pass only where the activation is SiLU."""
    model = make_causal_lm(left_tokenizer, family, seed=3, hidden_act=act).to(DEVICE)
    enc = left_tokenizer(
        ["Human: hi\n\nAssistant:", "Human: tell me a story\n\nAssistant:"], return_tensors="pt", padding=True
    )
    ids, mask = enc.input_ids.to(DEVICE), enc.attention_mask.to(DEVICE)
    params = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True)
    want = CompiledBackend(copy.deepcopy(model), max_seq_len=64).generate(ids, mask, params)
    routed = []
    kernel = skinny_gemm.linear
    monkeypatch.setattr(
        skinny_gemm, "linear", lambda *a, **kw: routed.append(kw.get("glu", False)) or kernel(*a, **kw)
    )
    monkeypatch.setitem(skinny_gemm.CONFIG, "ENABLED", True)
    backend = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    got = backend.generate(ids, mask, params)
    assert backend.fused_modules > 0
    layers = model.config.num_hidden_layers
    # 4 products per layer and decode step (the prefill's 2 x width rows also fit under MAX_ROWS here)
    assert len(routed) >= 4 * layers * params.max_new_tokens
    assert sum(routed) == (len(routed) // 4 if act == "silu" else 0)  # one GLU pass of every block's four
    assert all(
        m._rlhf_kit_silu == (act == "silu") for m in backend.model.modules() if hasattr(m, "_rlhf_kit_silu")
    )
    assert torch.equal(want.sequences, got.sequences)
    assert torch.allclose(want.logprobs, got.logprobs, atol=1e-4)


def test_a_real_like_bf16_checkpoint_generates_through_the_skinny_products(tmp_path, monkeypatch):
    """bf16 weights on disk, pad == EOS in the tokenizer, a config pad id that differs, attention dropout and
    sampling settings in generation_config: with the skinny products on, every block still fuses (its
    self-check passes in bf16), every decode product and the GLU pass run through the kernel, and greedy
    decoding stops at the same EOS with the same tokens as the default path, log-probs within bf16
    rounding (the float64 tests above pin the kernel's arithmetic; this tiny model's output barely moves
    with its MLP)."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    model = model.to(DEVICE)
    ids, mask = enc.input_ids.to(DEVICE), enc.attention_mask.to(DEVICE)
    want = CompiledBackend(copy.deepcopy(model), max_seq_len=64).generate(ids, mask, params)
    routed = []
    kernel = skinny_gemm.linear
    monkeypatch.setattr(
        skinny_gemm, "linear", lambda *a, **kw: routed.append(kw.get("glu", False)) or kernel(*a, **kw)
    )
    monkeypatch.setitem(skinny_gemm.CONFIG, "ENABLED", True)
    backend = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    assert backend.fused_modules == 2 * model.config.num_hidden_layers  # the self-checks passed in bf16
    routed.clear()  # the self-checks' calls
    got = backend.generate(ids, mask, params)
    assert routed and sum(routed) == len(routed) // 4  # four products per block, one of them the GLU pass
    assert torch.equal(want.sequences, got.sequences) and torch.equal(want.finished, got.finished)
    assert (want.logprobs - got.logprobs).abs().max() < 5e-2
