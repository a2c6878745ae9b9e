"""FP8 backward products (rlhf_kit.models.fp8) on CPU: torch's ``_scaled_mm`` runs there, so the numerics
are real; only the speed needs a GPU."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_kit.errors import ConfigError
from rlhf_kit.models import TokenValueModel
from rlhf_kit.models.fp8 import convert_to_fp8_backward, fp8_capable
from rlhf_kit.training.options import TrainingOptions, check_fp8_backward
from tests.conftest import make_causal_lm, make_reward_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _backward(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().log_softmax(-1)[..., 7].mean().backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["weights", "all"])
def test_forward_unchanged_and_backward_close(tokenizer, mode):
    """The forward pass is bit for bit the bf16 model's. "weights" leaves the input gradients exact (the
    embedding's gradient arrives through every layer's input gradient), "all" changes them; every
    weight gradient stays close to bf16's."""
    base = make_causal_lm(tokenizer, seed=3).to(torch.bfloat16)
    fp8 = copy.deepcopy(base)
    assert convert_to_fp8_backward(fp8, mode) == 2 * 7  # q, k, v, o, gate, up, down in both blocks
    ids = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    ref_logits, ref = _backward(base, ids)
    logits, grads = _backward(fp8, ids)
    assert torch.equal(logits, ref_logits)
    embed = "model.embed_tokens.weight"
    assert torch.equal(grads[embed], ref[embed]) == (mode == "weights")
    assert _rel(grads[embed], ref[embed]) < 0.2
    linear = [n for n in ref if "layers." in n and n.endswith("proj.weight")]
    assert len(linear) == 14
    errors = [_rel(grads[n], ref[n]) for n in linear]
    assert 0 < max(errors) < 0.25 and all(e == e for e in errors), errors
    # norms and the LM head are not converted: their gradients differ only through input gradients
    assert torch.equal(grads["model.norm.weight"], ref["model.norm.weight"])  # above every block
    first = "model.layers.0.input_layernorm.weight"  # below every block's input gradient
    assert torch.equal(grads[first], ref[first]) == (mode == "weights")


def test_only_block_linears_convert_and_the_model_stays_plain(tokenizer, tmp_path):
    """Heads (LM head, value head) stay ``nn.Linear``; the parameters are the same objects, so an optimizer
    built before or after sees them; the state dict and a saved directory are a plain model's."""
    actor = make_causal_lm(tokenizer, seed=1).to(torch.bfloat16)
    critic = TokenValueModel(make_reward_model(tokenizer, seed=2)).to(torch.bfloat16)
    params = {id(p) for p in actor.parameters()}
    keys = list(actor.state_dict())
    convert_to_fp8_backward(actor, "weights")
    assert convert_to_fp8_backward(critic, "weights") == 14
    assert {id(p) for p in actor.parameters()} == params and list(actor.state_dict()) == keys
    assert type(actor.lm_head) is torch.nn.Linear
    assert type(actor.model.layers[0].mlp.down_proj).__name__ == "Float8Linear"
    heads = [m for n, m in critic.named_modules() if isinstance(m, torch.nn.Linear) and "layers." not in n]
    assert heads and all(type(m) is torch.nn.Linear for m in heads)
    actor.save_pretrained(tmp_path / "a")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert all(type(m).__name__ != "Float8Linear" for m in plain.modules())
    for name, value in actor.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name


def test_layers_fp8_cannot_multiply_are_left_alone(tokenizer):
    """A projection whose size is not a multiple of 16 stays bf16; a model with none to convert is an error."""
    model = make_causal_lm(tokenizer, intermediate_size=120).to(torch.bfloat16)  # gate/up/down: 120
    assert convert_to_fp8_backward(model, "all") == 2 * 4  # attention only
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    odd = make_causal_lm(
        tokenizer, hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=88
    )
    with pytest.raises(ConfigError, match="no linear layer with sizes divisible by 16"):
        convert_to_fp8_backward(odd, "weights")
    assert convert_to_fp8_backward(odd, "off") == 0


def test_lora_and_missing_torchao_are_one_line_errors(tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_causal_lm(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="LoRA"):
        convert_to_fp8_backward(lora, "weights")
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails as if torchao were absent
    with pytest.raises(ConfigError, match=r"pip install 'rlhf-kit\[lowbit\]'"):
        convert_to_fp8_backward(make_causal_lm(tokenizer), "weights")


def test_check_fp8_backward_before_any_model(monkeypatch):
    opts = TrainingOptions(fp8_backward="weights")
    with pytest.raises(ConfigError, match="needs bf16 trained weights"):
        check_fp8_backward(opts, "cpu")
    check_fp8_backward(TrainingOptions(fp8_backward="weights", master_weights=True), "cpu")
    check_fp8_backward(TrainingOptions(fp8_backward="all", optimizer="adamw8bit"), "cpu")
    with pytest.raises(ConfigError, match="drop --lora-r"):
        check_fp8_backward(TrainingOptions(fp8_backward="all", master_weights=True, lora_r=8), "cpu")
    check_fp8_backward(TrainingOptions(lora_r=8), "cpu")  # off: nothing checked
    with pytest.raises(ConfigError, match="compute capability 8.9.*meta has none"):  # neither CPU nor CUDA
        check_fp8_backward(TrainingOptions(fp8_backward="all", master_weights=True), "meta")
    # the capability check, on a pretend GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    assert not fp8_capable("cuda:0")
    with pytest.raises(ConfigError, match="compute capability 8.9.*A100 has none"):
        check_fp8_backward(TrainingOptions(fp8_backward="all", master_weights=True), "cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8_capable("cuda:0") and fp8_capable("cpu")


def test_place_models_converts_the_trainable_models_only(tokenizer):
    """``place_models(fp8_backward=...)`` converts actor and critic before the optimizers (masters of the
    same parameters) and leaves frozen models alone; a step through the master weights trains."""
    from rlhf_kit.training.hf import make_accelerator
    from rlhf_kit.training.placement import OptimSettings, place_models

    actor, frozen = make_causal_lm(tokenizer, seed=1), make_causal_lm(tokenizer, seed=4)
    placed = place_models(
        make_accelerator("no"), {"actor": (actor, OptimSettings(1e-3))}, [frozen], warmup_steps=1,
        total_steps=4, master_weights=True, fp8_backward="weights",
    )  # fmt: skip
    actor = placed.models["actor"]
    kinds = {type(m).__name__ for m in actor.modules()}
    assert "Float8Linear" in kinds and all(type(m).__name__ != "Float8Linear" for m in frozen.modules())
    before = actor.model.layers[0].mlp.down_proj.weight.detach().clone()
    ids = torch.randint(3, 400, (2, 16))
    placed.backward(actor(input_ids=ids).logits.float().logsumexp(-1).mean())
    placed.optimizers["actor"].step()
    assert not torch.equal(before, actor.model.layers[0].mlp.down_proj.weight)


def test_compiled_blocks_trace_the_fp8_layers(tokenizer):
    """Dynamo traces the converted blocks (compile_blocks, as the recipes do on a GPU, after conversion):
    forward and FP8 weight gradients equal eager's; a second length recompiles and still does."""
    from rlhf_kit.models.compile import compile_blocks

    eager = make_causal_lm(tokenizer, seed=6).to(torch.bfloat16)
    convert_to_fp8_backward(eager, "all")
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager")
    for length in (20, 28):
        ids = torch.randint(3, 500, (3, length), generator=torch.Generator().manual_seed(length))
        ref_logits, ref = _backward(eager, ids)
        logits, grads = _backward(compiled, ids)
        assert torch.equal(logits, ref_logits)
        for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
            assert torch.equal(grads[name], ref[name]), name


def test_converted_models_still_run_packed(tokenizer):
    """torchao's layers carry their own ``config`` (a Float8LinearConfig); the packed-pass checks look for
    the model's HF config and must not take it for an unverified model type (which turned packed passes
    off under "auto", silently, and failed under "on")."""
    from rlhf_kit.models.varlen import unsupported_reason, use_packed

    model = make_causal_lm(tokenizer).to(torch.bfloat16)
    convert_to_fp8_backward(model, "weights")
    ids = torch.randint(3, 500, (2, 12))
    assert unsupported_reason(model, 12) is None
    assert use_packed("on", model, ids)
