"""Deferred residual adds in a backend's inference copy (rlhf_kit.generation.deferred): each block returns
``(h, mlp_out)``, the next block's first norm adds them, the tokens and log-probs are those of the unchanged
model, any other call gets the model's own forward, and a model that fails the check stays as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_kit.generation import CompiledBackend, SamplingParams
from rlhf_kit.generation import deferred as deferred_mod
from rlhf_kit.generation.static_cache import prefill_inputs
from tests.conftest import make_causal_lm, real_like_chat_batch

PROMPTS = ["Human: hi\n\nAssistant:", "Human: what is a good name for a cat?\n\nAssistant:"]


def _mask_inputs(n: int, width: int, pad: int):
    mask = torch.ones(n, width, dtype=torch.long)
    mask[0, :pad] = 0
    return (*prefill_inputs(mask, torch.float32), mask)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_blocks_return_the_pair_and_the_logits_are_unchanged(left_tokenizer, family):
    model = make_causal_lm(left_tokenizer, family, seed=3)
    ids = torch.randint(0, len(left_tokenizer), (2, 9))
    additive, positions, mask = _mask_inputs(2, 9, 3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=additive, position_ids=positions, use_cache=False).logits
        plain = model(input_ids=ids, attention_mask=mask).logits  # HF's own path: 2D mask, its own positions
    assert deferred_mod.defer_residuals(model)
    block = model.model.layers[1]
    h = torch.randn(2, 9, model.config.hidden_size)
    pair = block(h, pending=torch.ones_like(h), attention_mask=additive, position_ids=positions,
                 position_embeddings=model.model.rotary_emb(h, positions))  # fmt: skip
    assert isinstance(pair, tuple) and len(pair) == 2  # (h, mlp_out), the add left to the next block
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=additive, position_ids=positions, use_cache=False).logits
        assert torch.allclose(got, want, atol=1e-5)
        # a call the loop does not take (2D mask) runs the model's own forward through the same blocks
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, plain, atol=1e-5)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1


def test_gpt2_and_neox_blocks_are_left_alone(left_tokenizer):
    for family in ("gpt2", "gpt_neox"):
        model = make_causal_lm(left_tokenizer, family, seed=1)
        assert not deferred_mod.defer_residuals(model)
        assert not any("forward" in vars(m) for m in model.modules())


def test_a_loop_that_disagrees_is_undone(left_tokenizer, monkeypatch, caplog):
    model = make_causal_lm(left_tokenizer, "llama", seed=0)
    ids = torch.randint(0, len(left_tokenizer), (2, 7))
    want = model(input_ids=ids).logits

    def wrong(
        self, hidden_states, *args, pending=deferred_mod._MARK, **kwargs
    ):  # drops the attention residual
        if pending is deferred_mod._MARK:
            return type(self).forward(self, hidden_states, *args, **kwargs)
        h = hidden_states + pending
        return h, self.mlp(self.post_attention_layernorm(h))

    monkeypatch.setattr(deferred_mod, "_block_forward", wrong)
    assert not deferred_mod.defer_residuals(model)
    assert "kept as it was" in caplog.text
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_backend_generates_what_it_generates_without(left_tokenizer, family):
    """Greedy tokens and their log-probs through the deferred loop (prefill and decode steps) against the
    same backend with the adds where the model has them."""
    model = make_causal_lm(left_tokenizer, family, seed=4)
    enc = left_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    params = SamplingParams(max_new_tokens=8, greedy=True, ignore_eos=True)
    on = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    assert on.deferred_residuals
    off = CompiledBackend(copy.deepcopy(model), max_seq_len=64, fuse=False)
    assert not off.deferred_residuals
    seen = []
    on.model.model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append("pending" in kw), with_kwargs=True
    )
    a = on.generate(enc.input_ids, enc.attention_mask, params)
    assert seen and all(seen)  # the prefill and every decode step went through the loop
    b = off.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(a.sequences, b.sequences)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-4


def test_a_real_like_bf16_checkpoint_defers_and_generates_like_the_plain_backend(tmp_path):
    model, enc, params = real_like_chat_batch(str(tmp_path / "ckpt"))
    on = CompiledBackend(copy.deepcopy(model), max_seq_len=64)
    assert on.deferred_residuals
    off = CompiledBackend(copy.deepcopy(model), max_seq_len=64, fuse=False)
    a = on.generate(enc.input_ids, enc.attention_mask, params)
    b = off.generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(a.sequences, b.sequences)
    assert (a.logprobs - b.logprobs).abs().max() < 5e-2


def test_a_cache_given_as_past_key_values_reaches_the_models_own_forward(left_tokenizer):
    """The decoder's own forward takes ``past_key_values`` (a deprecated name of ``cache``): such a call is not
    the backend's, so it must reach that forward with its cache, which then holds the prompt."""
    from transformers import DynamicCache

    model = make_causal_lm(left_tokenizer, "llama", seed=2)
    assert deferred_mod.defer_residuals(model)
    ids = torch.randint(0, len(left_tokenizer), (2, 9))
    additive, positions, _ = _mask_inputs(2, 9, 3)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=additive, position_ids=positions, past_key_values=cache)
    assert cache.get_seq_length() == 9
