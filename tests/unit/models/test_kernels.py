"""rlhf_kit.models.kernels: liger-kernel is a CUDA extra, so its kernels never run on CI; what runs is our
side of it: the install hint, the dispatch by model type through peft/DDP wrappers, and which of liger's
pieces are asked for (never its LM losses)."""

import sys
import types

import pytest
from peft import LoraConfig, get_peft_model

from rlhf_kit.errors import ConfigError
from rlhf_kit.models.kernels import apply_liger_kernels, liger_model_types
from tests.conftest import make_reward_model


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in ``liger_kernel.transformers.monkey_patch`` recording each call."""
    calls = []

    def apply_llama(
        rope=True,
        cross_entropy=False,
        fused_linear_cross_entropy=True,
        rms_norm=True,
        swiglu=True,
        model=None,
    ):  # fmt: skip  (liger 0.8.5's signature)
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))  # fmt: skip

    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_llama}
    pkg, sub = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    pkg.transformers, sub.monkey_patch = sub, patch
    for name, mod in (("liger_kernel", pkg), ("liger_kernel.transformers", sub), (patch.__name__, patch)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_missing_liger_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'rlhf-kit\[liger\]'"):
        liger_model_types()


def test_applies_norm_swiglu_rope_only_to_the_unwrapped_model(tokenizer, fake_liger):
    rm = make_reward_model(tokenizer)
    wrapped = get_peft_model(rm, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert apply_liger_kernels(wrapped) == "llama"
    (call,) = fake_liger
    assert call["model"] is rm  # peft's base model, where liger patches the modules
    assert call["rms_norm"] and call["swiglu"] and call["rope"]
    assert not call["cross_entropy"] and not call["fused_linear_cross_entropy"]


def test_unknown_model_type_is_refused(tokenizer, fake_liger):
    rm = make_reward_model(tokenizer, family="gpt2")
    with pytest.raises(ConfigError, match="no kernels for model type 'gpt2'"):
        apply_liger_kernels(rm)
    assert not fake_liger
