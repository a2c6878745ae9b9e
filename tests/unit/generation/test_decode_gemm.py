"""The decode-step projection kernel (rlhf_kit.generation.decode_gemm) against a float64 reference, its
fallbacks, and the compiled backend's tokens with it.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py); on a CUDA
machine the same tests run the compiled kernel on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_kit.generation import CompiledBackend, SamplingParams, decode_gemm
from rlhf_kit.generation.decode_gemm import MAX_ROWS, applies, decode_linear, linear
from rlhf_kit.generation.fused import use_decode_gemm
from tests.conftest import make_causal_lm, real_like_chat_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m, n, k, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    return [t.to(dtype).to(DEVICE) if t is not None else None for t in (x, w, b)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m, n, k, bias",
    [
        (
            64,
            192,
            1024,
            False,
        ),  # two K chunks of two steps: the partials summed by the last program of a tile
        (
            16,
            512,
            600,
            False,
        ),  # eight tiles fill the programs: one chunk of three steps, the last one partial
        (16, 192, 1100, True),  # three chunks of two steps of 256, the last chunk past K (masked)
        (5, 100, 300, True),  # rows, columns and K all partial tiles; a bias
        (1, 64, 48, False),  # one row, one chunk (no split), K below a chunk
        (33, 130, 700, True),  # three tiles of 64 columns, the last of 2
    ],
)
def test_kernel_matches_float64_reference(m, n, k, bias, dtype):
    x, w, b = _case(m, n, k, dtype, bias, seed=m + n)
    got = decode_linear(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (m, n) and got.dtype == dtype
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < 5e-3, rel
    # the counters of every tile are zero again, ready for the next call or graph replay
    assert decode_gemm._COUNTERS[torch.device(DEVICE)][0].eq(0).all()


def test_plan_splits_k_only_as_far_as_the_programs_need(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setitem(decode_gemm._SMS, cuda, 132)  # an H100's streaming multiprocessors; no GPU needed
    cfg = {**decode_gemm.CONFIG, "BN": 64, "KC": 256, "WAVES": 2}
    assert decode_gemm.plan(11264, 2048, cuda, cfg) == (176, 2, 4, 256)  # 1B gate/up: 352 programs
    assert decode_gemm.plan(2048, 2048, cuda, cfg) == (32, 8, 1, 256)  # 1B output: 256
    assert decode_gemm.plan(2048, 5632, cuda, cfg) == (32, 8, 3, 256)  # 1B down: 22 steps in 8 chunks of 3
    assert decode_gemm.plan(1024, 40, cuda, cfg) == (16, 1, 1, 64)  # K below a step: one step of 64


def test_leading_dims_kept_and_repeat_calls_agree(monkeypatch):
    """(b, t, K) in, (b, t, N) out; each call takes its own counters, wrapping around the pool."""
    monkeypatch.setattr(decode_gemm, "_POOL", 8)
    decode_gemm._COUNTERS.pop(torch.device(DEVICE), None)
    x, w, b = _case(6, 192, 512, torch.bfloat16, True, seed=1)
    first = decode_linear(x.view(2, 3, 512), w, b)
    assert first.shape == (2, 3, 192)
    offsets = []
    for _ in range(4):  # 3 tiles per call in a pool of 8: offsets 3, 6 -> wrap to 0, 3
        offsets.append(decode_gemm._COUNTERS[torch.device(DEVICE)][1])
        assert torch.equal(decode_linear(x.view(2, 3, 512), w, b), first)
    assert offsets == [3, 6, 3, 6]
    decode_gemm._COUNTERS.pop(torch.device(DEVICE), None)  # a pool of the real size for the other tests
    with pytest.raises(ValueError, match="tiles exceed"):
        decode_linear(*_case(2, 9 * 64, 32, torch.bfloat16, False, seed=2)[:2])


def test_what_the_kernel_takes_and_where_linear_falls_back():
    x, w, b = _case(MAX_ROWS + 1, 64, 64, torch.bfloat16, True, seed=3)
    assert applies(x[:MAX_ROWS], w) and not applies(x, w)  # too many rows (a prefill)
    assert not applies(x[:4].float(), w.float())  # float32
    assert not applies(x[:4], w.T.contiguous().T)  # a weight whose rows are not contiguous
    for args in ((x, w, b), (x[:4].float(), w.float(), b.float())):
        torch.testing.assert_close(linear(*args, use_kernel=True), F.linear(*args), rtol=0, atol=0)
    assert torch.equal(linear(x[:4], w, b, use_kernel=False), F.linear(x[:4], w, b))
    with pytest.raises(ValueError, match="rows"):
        decode_linear(x, w, b)


def test_custom_op_registration():
    x, w, b = _case(4, 64, 128, torch.bfloat16, True, seed=4)
    torch.library.opcheck(decode_linear, (x, w, b))
    torch.library.opcheck(decode_linear, (x, w))


def _backend(model, on):
    return CompiledBackend(copy.deepcopy(model), max_seq_len=96, decode_gemm=on)


def test_backend_with_the_kernel_generates_the_same_greedy_tokens(left_tokenizer):
    """A float16 llama: every decode-step product through the kernel, the prefill through F.linear; the
    greedy tokens and their log-probs are those of the backend without it."""
    model = make_causal_lm(left_tokenizer, "llama", seed=5).to(DEVICE, torch.float16)
    prompts = ["Human: hi\n\nAssistant:", "Human: how do I boil an egg?\n\nAssistant:"] * 2
    enc = left_tokenizer(prompts, return_tensors="pt", padding=True).to(DEVICE)
    params = SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True)
    off, on = _backend(model, False), _backend(model, True)
    assert on.decode_gemm and not off.decode_gemm
    calls = []
    real = decode_gemm.decode_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_gemm, "decode_linear", lambda *a: calls.append(a[0].shape) or real(*a))
        got = on.generate(enc.input_ids, enc.attention_mask, params)
    want = off.generate(enc.input_ids, enc.attention_mask, params)
    assert calls and all(s[:-1].numel() <= MAX_ROWS for s in calls)
    assert torch.equal(got.sequences, want.sequences)
    assert (got.logprobs - want.logprobs).abs().max() < 2e-2


def test_a_kernel_that_disagrees_is_not_used(left_tokenizer, monkeypatch):
    model = make_causal_lm(left_tokenizer, "llama", seed=6).to(DEVICE, torch.bfloat16)
    monkeypatch.setattr(decode_gemm, "decode_linear", lambda x, w, b=None: F.linear(x, w, b) + 1)
    backend = _backend(model, True)
    assert backend.fused_modules and not backend.decode_gemm
    assert not any(getattr(m, "_rlhf_kit_decode_gemm", False) for m in backend.model.modules())
    assert not use_decode_gemm(make_causal_lm(left_tokenizer, "gpt2"))  # nothing fused: nothing to route


def test_a_real_like_bf16_checkpoint_generates_the_same_with_the_kernel(tmp_path):
    """bf16 weights, pad == EOS, a config pad id that differs, attention dropout, EOS stops: the kernel's
    tokens, ends and log-probs are those of F.linear."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    model, enc = model.to(DEVICE), enc.to(DEVICE)
    a = _backend(model, False).generate(enc.input_ids, enc.attention_mask, params)
    on = _backend(model, True)
    b = on.generate(enc.input_ids, enc.attention_mask, params)
    assert on.decode_gemm
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.finished, b.finished)
    assert (a.logprobs - b.logprobs).abs().max() < 5e-2


def test_two_decode_chains_with_the_kernel(left_tokenizer):
    """Two chains (two streams on CUDA, each product of both at once) take their own counters: the tokens and
    log-probs of one chain with the kernel."""
    model = make_causal_lm(left_tokenizer, "llama", seed=7).to(DEVICE, torch.float16)
    prompts = ["Human: hi\n\nAssistant:", "Human: what is a good name for a cat?\n\nAssistant:"] * 3
    enc = left_tokenizer(prompts, return_tensors="pt", padding=True).to(DEVICE)
    params = SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True)
    one = _backend(model, True)
    two = CompiledBackend(copy.deepcopy(model), max_seq_len=96, decode_gemm=True, decode_chains=2)
    a = one.generate(enc.input_ids, enc.attention_mask, params)
    b = two.generate(enc.input_ids, enc.attention_mask, params)
    assert two.decode_gemm and len(two._chains[8]) == 2
    assert torch.equal(a.sequences, b.sequences)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-2
