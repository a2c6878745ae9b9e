"""HFBackend vs CompiledBackend on tiny models of every family: greedy equality, log-probs, EOS, stop
strings, min_new_tokens, weight updates, bucketing, sleep/wake."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, GenerationBackend, HFBackend, SamplingParams
from rlhf_kit.logprobs import sequence_logprobs
from tests.conftest import make_causal_lm

PROMPTS = [
    "Human: How do I bake bread at home?\n\nAssistant:",
    "Human: hi\n\nAssistant:",
    "Human: What is the capital of France, and why is it there?\n\nAssistant:",
]


@pytest.fixture(scope="module")
def batch(left_tokenizer):
    enc = left_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _backends(tok, family, seed=0, **kw):
    model = make_causal_lm(tok, family, seed=seed)
    compiled = CompiledBackend(copy.deepcopy(model), max_batch_size=4, max_seq_len=128, tokenizer=tok, **kw)
    return model, HFBackend(model, tok), compiled


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences), f"\n{a.responses}\n{b.responses}"
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.finished, b.finished)
    assert a.prompt_length == b.prompt_length


def test_greedy_compiled_equals_hf_and_logprobs_match_recompute(left_tokenizer, family, batch):
    ids, mask = batch
    model, hf, compiled = _backends(left_tokenizer, family)
    assert isinstance(compiled, GenerationBackend) and isinstance(hf, GenerationBackend)
    params = SamplingParams(max_new_tokens=16, greedy=True)
    a, b = hf.generate(ids, mask, params), compiled.generate(ids, mask, params)
    _assert_same(a, b)
    assert a.sequences.shape == (3, ids.shape[1] + 16) and torch.equal(a.sequences[:, : ids.shape[1]], ids)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5

    # sampled (top-k/top-p filtered) tokens: the reported log-probs are those of the full tempered
    # distribution, i.e. exactly what the training model recomputes
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_k=40, top_p=0.9, seed=1)
    out = compiled.generate(ids, mask, params)
    re = sequence_logprobs(model, out.sequences, out.attention_mask, out.prompt_length, temperature=0.7)
    diff = ((re - out.logprobs) * out.response_mask).abs().max().item()
    print(f"{family}: max |sampler logprob - recomputed| = {diff:.2e}")
    assert diff < 1e-4
    assert torch.all(out.logprobs <= 0) and torch.all(out.logprobs[out.response_mask == 0] == 0)


def test_hf_sampled_logprobs_match_recompute(left_tokenizer, batch):
    ids, mask = batch
    model, hf, _ = _backends(left_tokenizer, "llama")
    out = hf.generate(ids, mask, SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.8, seed=0))
    re = sequence_logprobs(model, out.sequences, out.attention_mask, out.prompt_length, temperature=1.3)
    assert ((re - out.logprobs) * out.response_mask).abs().max() < 1e-4


def _greedy_tokens(backend, ids, mask, n=10):
    return backend.generate(ids, mask, SamplingParams(max_new_tokens=n, greedy=True, ignore_eos=True))


def test_eos_ends_response_and_pads_after(left_tokenizer, batch):
    ids, mask = batch
    _, hf, compiled = _backends(left_tokenizer, "qwen2", seed=3)
    free = _greedy_tokens(compiled, ids, mask).responses
    eos = int(free[0, 4])  # make row 0's 5th greedy token the EOS
    params = SamplingParams(max_new_tokens=10, greedy=True, eos_token_id=[eos, 10**6])
    a, b = hf.generate(ids, mask, params), compiled.generate(ids, mask, params)
    _assert_same(a, b)
    first = int((free[0] == eos).nonzero()[0, 0])
    assert a.response_mask[0].tolist() == [1] * (first + 1) + [0] * (a.response_mask.shape[1] - first - 1)
    assert bool(a.finished[0])
    pad = left_tokenizer.pad_token_id
    assert torch.all(a.responses[0, first + 1 :] == pad)
    for row in range(3):  # every row: mask is a prefix, ends at EOS iff finished
        m = a.response_mask[row]
        n_valid = int(m.sum())
        assert torch.all(m[:n_valid] == 1)
        assert bool(a.finished[row]) == (int(a.responses[row, n_valid - 1]) == eos)


def test_min_new_tokens_blocks_eos(left_tokenizer, batch):
    ids, mask = batch
    _, hf, compiled = _backends(left_tokenizer, "llama", seed=5)
    free = _greedy_tokens(compiled, ids, mask).responses
    eos = int(free[1, 1])  # row 1 would stop after 2 tokens
    params = SamplingParams(max_new_tokens=9, min_new_tokens=6, greedy=True, eos_token_id=eos)
    a, b = hf.generate(ids, mask, params), compiled.generate(ids, mask, params)
    _assert_same(a, b)
    assert torch.all(a.response_mask.sum(1) >= 6)
    assert not torch.any(a.responses[:, :6] == eos)


def test_stop_strings(left_tokenizer, batch):
    ids, mask = batch
    tok = left_tokenizer
    _, hf, compiled = _backends(tok, "gpt2", seed=2)
    free = _greedy_tokens(compiled, ids, mask, n=16).responses
    text = tok.decode(free[0, 3:6].tolist())
    stop = text.strip()[:3] or text[:3]
    params = SamplingParams(max_new_tokens=16, greedy=True, stop_strings=(stop,), ignore_eos=True)
    a, b = hf.generate(ids, mask, params), compiled.generate(ids, mask, params)
    _assert_same(a, b)
    assert bool(a.finished[0])
    n0 = int(a.response_mask[0].sum())
    kept = a.responses[0, :n0].tolist()
    assert stop in tok.decode(kept) and stop not in tok.decode(kept[:-1])
    for row in range(3):
        n = int(a.response_mask[row].sum())
        assert bool(a.finished[row]) == (stop in tok.decode(a.responses[row, :n].tolist()))
    with pytest.raises(ValueError, match="tokenizer"):
        CompiledBackend(copy.deepcopy(compiled.model), max_seq_len=64).generate(ids, mask, params)


def test_update_weights_generates_like_a_fresh_model(left_tokenizer, batch):
    ids, mask = batch
    tok = left_tokenizer
    compiled = CompiledBackend(make_causal_lm(tok, "llama", seed=0), max_batch_size=4, max_seq_len=64)
    params = SamplingParams(max_new_tokens=10, greedy=True, ignore_eos=True)
    before = compiled.generate(ids, mask, params)
    target = make_causal_lm(tok, "llama", seed=7)
    fresh = HFBackend(copy.deepcopy(target)).generate(ids, mask, params)
    assert not torch.equal(before.sequences, fresh.sequences)
    ptrs = {n: p.data_ptr() for n, p in compiled.model.named_parameters()}
    assert compiled.update_weights(target.state_dict()) > 0
    assert {n: p.data_ptr() for n, p in compiled.model.named_parameters()} == ptrs  # in place
    _assert_same(compiled.generate(ids, mask, params), fresh)
    # a stream of (name, tensor) with wrapper prefixes, and a model, work too
    compiled.update_weights(make_causal_lm(tok, "llama", seed=0))
    _assert_same(compiled.generate(ids, mask, params), before)
    compiled.update_weights((f"module.{n}", t) for n, t in target.state_dict().items())
    _assert_same(compiled.generate(ids, mask, params), fresh)
    head = compiled.model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="not parameters"):  # nothing copied, not even the known name
        compiled.update_weights(
            {"lm_head.weight": torch.zeros_like(head), "model.layers.0.nope.weight": head}
        )
    with pytest.raises(ValueError, match="shape"):
        compiled.update_weights(
            {"lm_head.weight": torch.zeros_like(head), "model.norm.weight": torch.zeros(3)}
        )
    assert torch.equal(compiled.model.lm_head.weight, head)


def test_buckets_chunks_sleep_wake_and_early_exit(left_tokenizer, batch):
    ids, mask = batch
    tok = left_tokenizer
    model = make_causal_lm(tok, "gpt_neox", seed=1)
    hf = HFBackend(model, tok)
    compiled = CompiledBackend(copy.deepcopy(model), max_batch_size=2, batch_buckets=(1, 2), max_seq_len=64)
    five = (torch.cat([ids, ids[:2]]), torch.cat([mask, mask[:2]]))
    params = SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True)
    _assert_same(hf.generate(*five, params), compiled.generate(*five, params))  # chunks of 2, 2, 1
    assert compiled.kv_cache_bytes() > 0
    compiled.sleep()
    assert compiled.kv_cache_bytes() == 0
    compiled.wake()
    _assert_same(hf.generate(*five, params), compiled.generate(*five, params))
    # every row ends at once -> the loop exits at the next check instead of running 30 steps
    free = compiled.generate(ids, mask, params).responses
    eos = sorted({int(t) for t in free[:, 0]})
    early = CompiledBackend(copy.deepcopy(model), max_batch_size=4, max_seq_len=64, check_every=4)
    out = early.generate(ids, mask, SamplingParams(max_new_tokens=30, greedy=True, eos_token_id=eos))
    assert out.info["steps"] == 4 and out.response_mask.shape[1] == 1 and bool(out.finished.all())


def test_attention_function_is_sdpa_outside_generation(left_tokenizer, batch):
    ids, mask = batch
    model = make_causal_lm(left_tokenizer, "mistral")
    ref = model(input_ids=ids, attention_mask=mask).logits
    CompiledBackend(model, max_seq_len=64)  # switches the attention implementation of this model
    assert model.config._attn_implementation == "rlhf_kit_static_kv"
    got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ref, got, atol=1e-5)


@pytest.mark.parametrize("scope", ["step", "blocks"])
def test_compiled_decode_has_no_graph_breaks(left_tokenizer, batch, scope):
    """No graph breaks (e.g. host syncs) in the compiled decode: what CUDA-graph capture needs on GPU."""
    ids, mask = batch
    model = make_causal_lm(left_tokenizer, "llama")
    eager = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    traced = CompiledBackend(
        model,
        max_seq_len=64,
        compile=True,
        compile_options={"backend": "eager", "fullgraph": True},
        compile_scope=scope,
    )
    params = SamplingParams(max_new_tokens=6, top_k=20, top_p=0.95, min_new_tokens=2, seed=4)
    _assert_same(eager.generate(ids, mask, params), traced.generate(ids, mask, params))
    assert traced.mode == "compiled"
    # the second call's prefill runs through the compiled blocks ("blocks" only), also without breaks
    again = traced.generate(ids, mask, params)
    _assert_same(eager.generate(ids, mask, params), again)
    assert again.info["prefill"] == ("compiled" if scope == "blocks" else "eager")


def test_block_scope_compiles_one_block_for_every_layer(left_tokenizer, batch):
    """compile_scope="blocks": one graph for all layers (the KV buffers are module inputs, not a lookup
    by layer number that would specialise the block per layer), one for the sampler and one each for the
    final norm and the rotary embedding; greedy tokens equal the eager backend's, also after sleep/wake
    and with a second batch."""
    from torch._dynamo.utils import counters

    ids, mask = batch
    model = make_causal_lm(left_tokenizer, "qwen2", num_hidden_layers=4)
    eager = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    torch._dynamo.reset()
    counters.clear()
    blocks = CompiledBackend(model, max_seq_len=64, compile=True, compile_options={"backend": "eager"})
    params = SamplingParams(max_new_tokens=6, greedy=True)
    _assert_same(eager.generate(ids, mask, params), blocks.generate(ids, mask, params))
    assert blocks.compiled_edges == ["norm", "rotary_emb"]
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    blocks.sleep()
    assert blocks.kv_cache_bytes() == 0 and not any(hasattr(m, "_rlhf_kit_kv") for m in model.modules())
    _assert_same(eager.generate(ids[:2], mask[:2], params), blocks.generate(ids[:2], mask[:2], params))
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])


def test_input_validation(left_tokenizer, batch):
    ids, mask = batch
    compiled = CompiledBackend(make_causal_lm(left_tokenizer, "llama"), max_seq_len=64)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left padded"):
        compiled.generate(ids, right, SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        compiled.generate(ids, mask, SamplingParams(max_new_tokens=64))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_new_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="cuda_graphs"):
        CompiledBackend(make_causal_lm(left_tokenizer, "llama"), cuda_graphs=True)


def test_hf_backend_ignores_the_checkpoints_generation_config(left_tokenizer, batch):
    """A checkpoint's generation_config (repetition penalty, no-repeat n-grams, top-k, temperature) must
    not reshape what HFBackend samples from: greedy output equals the compiled backend's, and sampled
    log-probs equal the policy's recomputed ones."""
    from transformers import GenerationConfig

    ids, mask = batch
    model, hf, compiled = _backends(left_tokenizer, "llama", seed=2)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.05, top_k=3, repetition_penalty=3.0, no_repeat_ngram_size=1,
        eos_token_id=left_tokenizer.pad_token_id,
    )  # fmt: skip
    saved = model.generation_config.to_dict()
    params = SamplingParams(max_new_tokens=24, greedy=True, ignore_eos=True)
    a, b = hf.generate(ids, mask, params), compiled.generate(ids, mask, params)
    _assert_same(a, b)
    assert model.generation_config.to_dict() == saved  # restored after the call
    out = hf.generate(ids, mask, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, ignore_eos=True))
    re = sequence_logprobs(model, out.sequences, out.attention_mask, out.prompt_length)
    assert ((re - out.logprobs) * out.response_mask).abs().max() < 1e-4
    # with no filter the sampled tokens cover more than the checkpoint's top-3 would allow ...
    logits = model(out.sequences, attention_mask=out.attention_mask).logits[:, out.prompt_length - 1 : -1]
    rank = (logits > logits.gather(-1, out.responses[..., None])).sum(-1)
    assert int(rank.max()) >= 3


def test_triton_decode_attention_equals_hf_for_every_family_without_graph_breaks(
    left_tokenizer, family, batch
):
    """The Triton decode kernel (Triton's interpreter on CPU) in each family's decode step: greedy tokens and
    log-probs equal HF's, and the step traces whole (fullgraph) with the kernel's custom op inside."""
    ids, mask = batch
    model, hf, _ = _backends(left_tokenizer, family)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton takes CUDA tensors only
    kernel = CompiledBackend(
        copy.deepcopy(model).to(device),
        max_batch_size=4,
        max_seq_len=64,
        compile=True,
        compile_options={"backend": "eager", "fullgraph": True},
        decode_attention="triton",
    )
    params = SamplingParams(max_new_tokens=8, greedy=True)
    a, b = hf.generate(ids, mask, params), kernel.generate(ids, mask, params)
    _assert_same(a, b)
    assert (a.logprobs - b.logprobs).abs().max() < (1e-5 if device == "cpu" else 1e-4)
    assert kernel.mode == ("compiled" if device == "cpu" else "compiled+graph")


def test_prefill_runs_through_the_compiled_blocks_and_equals_hf(left_tokenizer, family, batch, monkeypatch):
    """Once the KV buffers exist, the prompt runs through the compiled blocks (traced whole), widened to
    a multiple of PREFILL_ALIGN with more left padding: HF's greedy tokens and log-probs are unchanged.
    A prompt width in the same multiple reuses the compiled prefill; past MAX_PREFILL_SHAPES the prefill
    runs eagerly."""
    from torch._dynamo.utils import counters

    from rlhf_kit.generation import compiled as compiled_module

    ids, mask = batch
    model, hf, _ = _backends(left_tokenizer, family)
    torch._dynamo.reset()
    counters.clear()
    backend = CompiledBackend(
        copy.deepcopy(model),
        max_batch_size=4,
        max_seq_len=128,
        compile=True,
        compile_options={"backend": "eager", "fullgraph": True},
    )
    params = SamplingParams(max_new_tokens=8, greedy=True)
    want = hf.generate(ids, mask, params)
    first = backend.generate(ids, mask, params)  # allocates the KV buffers: an eager prefill
    assert first.info["prefill"] == "eager"
    second = backend.generate(ids, mask, params)
    assert second.info["prefill"] == "compiled"
    width = second.info["prefill_width"]
    assert width % compiled_module.PREFILL_ALIGN == 0 and width > ids.shape[1]
    for out in (first, second):
        _assert_same(want, out)
        assert (want.logprobs - out.logprobs).abs().max() < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    # the block, the final norm and the rotary embedding at decode and at prefill shapes, the sampler
    edges = {"gpt2": [], "gpt_neox": ["rotary_emb"]}  # torch's own LayerNorm is not compiled
    assert backend.compiled_edges == edges.get(family, ["norm", "rotary_emb"])
    assert graphs == 3 + 2 * len(backend.compiled_edges), dict(counters["stats"])
    shorter = ids[:, 1:], mask[:, 1:]  # one column less: the same rounded width
    _assert_same(hf.generate(*shorter, params), backend.generate(*shorter, params))
    assert counters["stats"]["unique_graphs"] == graphs
    monkeypatch.setattr(compiled_module, "MAX_PREFILL_SHAPES", 1)
    wider = torch.cat([torch.full((3, 16), left_tokenizer.pad_token_id), ids], 1)
    wide_mask = torch.cat([torch.zeros(3, 16, dtype=mask.dtype), mask], 1)
    out = backend.generate(wider, wide_mask, params)
    assert out.info["prefill"] == "eager" and out.info["prefill_width"] == wider.shape[1]
    assert torch.equal(out.responses, want.responses)


def test_prompt_checks_read_the_device_once_and_name_the_bad_row(host_reads):
    from rlhf_kit.generation.base import check_prompts

    ids = torch.ones(3, 4, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    host_reads.clear()
    check_prompts(ids, mask)  # valid prompts: one read for both checks (each read waits for a GPU)
    assert host_reads.ours() == ["tolist"], host_reads
    with pytest.raises(ValueError, match="row 2 of attention_mask has a 0 after a 1"):
        check_prompts(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="prompt row 1 is empty"):
        check_prompts(ids, torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]]))
