"""Fused QKV and gate/up projections of a backend's inference copy: same names, same outputs, weight
updates reach the stacked storage, and a module whose fused forward disagrees stays unfused."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, SamplingParams
from rlhf_kit.generation import fused as fused_mod
from rlhf_kit.generation.static_cache import static_kv_attention
from tests.conftest import make_causal_lm, real_like_chat_batch


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"])
def test_fuse_keeps_names_and_outputs(left_tokenizer, family):
    model = make_causal_lm(left_tokenizer, family, seed=5)
    ids = torch.randint(0, len(left_tokenizer), (2, 9))
    want = model(input_ids=ids).logits
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    n = fused_mod.fuse_projections(model, static_kv_attention)
    layers = model.config.num_hidden_layers
    assert n == (2 * layers if family in ("llama", "mistral", "qwen2") else 0)
    assert set(model.state_dict()) == set(keys)  # the stacked tensors are non-persistent buffers
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


def test_weight_updates_reach_the_stacked_weights(left_tokenizer):
    """update_weights copies into q_proj.weight (a view): the fused product must use the new values,
    so a backend updated to another model's weights generates exactly what that model's backend does."""
    a, b = make_causal_lm(left_tokenizer, "qwen2", seed=1), make_causal_lm(left_tokenizer, "qwen2", seed=2)
    enc = left_tokenizer(
        ["Human: hi\n\nAssistant:", "Human: tell me a story\n\nAssistant:"], return_tensors="pt", padding=True
    )
    params = SamplingParams(max_new_tokens=10, greedy=True, ignore_eos=True)
    backend = CompiledBackend(copy.deepcopy(a), max_seq_len=64)
    assert backend.fused_modules > 0
    backend.update_weights(b.state_dict())
    attn = backend.model.model.layers[0].self_attn
    assert torch.equal(
        attn._rlhf_kit_qkv[: attn.q_proj.out_features], b.model.layers[0].self_attn.q_proj.weight
    )
    want = CompiledBackend(copy.deepcopy(b), max_seq_len=64, fuse=False).generate(
        enc.input_ids, enc.attention_mask, params
    )
    got = backend.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(want.sequences, got.sequences)


def test_a_fused_forward_that_disagrees_stays_unfused(left_tokenizer, monkeypatch, caplog):
    model = make_causal_lm(left_tokenizer, "llama", seed=0)
    ids = torch.randint(0, len(left_tokenizer), (2, 7))
    want = model(input_ids=ids).logits
    monkeypatch.setattr(
        fused_mod, "_fused_mlp_forward", lambda self, x: self.down_proj(self.act_fn(self.up_proj(x)))
    )
    n = fused_mod.fuse_projections(model, static_kv_attention)
    assert n == 1  # layer 0's attention fused; its MLP failed the check, so fusing stopped there
    assert "kept unfused" in caplog.text
    assert "forward" not in vars(model.model.layers[0].mlp) and "forward" not in vars(
        model.model.layers[1].self_attn
    )
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


def test_linears_with_mixed_biases_are_not_stacked(left_tokenizer):
    model = make_causal_lm(left_tokenizer, "qwen2", seed=0)  # q, k and v have biases
    ids = torch.randint(0, len(left_tokenizer), (2, 7))
    for layer in model.model.layers:
        layer.self_attn.k_proj.bias = None
    want = model(input_ids=ids).logits
    n = fused_mod.fuse_projections(model, static_kv_attention)
    assert n == model.config.num_hidden_layers  # the MLPs only
    assert not hasattr(model.model.layers[0].self_attn, "_rlhf_kit_qkv")
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


def test_a_real_like_bf16_checkpoint_fuses_and_generates_like_unfused(tmp_path):
    """bf16 weights on disk, pad == EOS in the tokenizer, config pad id 0 (not the tokenizer's), attention
    dropout 0.3 and sampling settings in generation_config: every block fuses at bf16 tolerance, and the
    fused backend's greedy output is the unfused backend's."""
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    fused = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    assert fused.fused_modules == 2 * model.config.num_hidden_layers
    plain = CompiledBackend(copy.deepcopy(model), max_seq_len=64, fuse=False)
    a = fused.generate(enc.input_ids, enc.attention_mask, params)
    b = plain.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.finished, b.finished)
    assert (a.logprobs - b.logprobs).abs().max() < 5e-2


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_decode_steps_leave_the_rotary_embedding_to_the_triton_kernel(left_tokenizer, family):
    """Llama's rotate_half convention is recognised, so under the Triton decode attention each decode step
    hands (cos, sin) to the kernel instead of rotating (the prefill still rotates first); the tokens equal
    the matmul path's, which rotates every step. Another convention, or another attention function, keeps
    the rotation outside."""
    model = make_causal_lm(left_tokenizer, family, seed=6)
    enc = left_tokenizer(
        ["Human: hi\n\nAssistant:", "Human: what is a good name for a cat?\n\nAssistant:"],
        return_tensors="pt",
        padding=True,
    )
    if torch.cuda.is_available():  # compiled Triton takes CUDA tensors only
        model, enc = model.cuda(), enc.to("cuda")
    params = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True)
    # not compiled, so the counting rotary below runs as Python (a CUDA graph replays without it)
    kernel = CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_attention="triton", compile=False)
    attn = kernel.model.model.layers[0].self_attn
    assert attn._rlhf_kit_plain_rotary
    calls = []

    class Counting(torch.nn.Module):  # a module: transformers >= 5.25 makes apply_rotary_pos_emb one
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, q, k, c, s):
            calls.append(q.shape[2])
            return self.inner(q, k, c, s)

    attn._rlhf_kit_rotary = Counting(attn._rlhf_kit_rotary)  # a throwaway backend: nothing to restore
    got = kernel.generate(enc.input_ids, enc.attention_mask, params)
    assert calls == [enc.input_ids.shape[1]]  # the prompt only: no decode step rotated outside the kernel
    want = CompiledBackend(copy.deepcopy(model), max_seq_len=64, decode_attention="matmul", compile=False)
    want = want.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(got.sequences, want.sequences)
    assert (got.logprobs - want.logprobs).abs().max() < (1e-4 if torch.cuda.is_available() else 1e-5)
    pads = (enc.attention_mask == 0).sum(-1)
    assert torch.equal(kernel._state.row_start[:2], pads)  # each row's first prompt slot
    other = make_causal_lm(left_tokenizer, family, seed=6)
    fused_mod.fuse_projections(other, lambda *a, **k: static_kv_attention(*a, **k))  # not the same function
    assert not other.model.layers[0].self_attn._rlhf_kit_plain_rotary
    assert not fused_mod._plain_rotary(lambda q, k, c, s: (q * c[:, None], k * c[:, None]), attn)
