import math

import pytest
import torch
from torch import nn

from rlhf_kit.training.optim import build_optimizer, clip_grad_norm, cosine_lr_factor, cosine_schedule
from tests.conftest import make_causal_lm


def test_no_weight_decay_on_biases_and_norms(tokenizer):
    for family in ("llama", "gpt2"):
        model = make_causal_lm(tokenizer, family)
        opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay_names = {names[id(p)] for p in no_decay["params"]}
        decay_names = {names[id(p)] for p in decay["params"]}
        assert all(p.ndim >= 2 for p in decay["params"])
        assert not any("norm" in n or "ln_" in n or n.endswith("bias") for n in decay_names)
        assert any("norm" in n or "ln_" in n for n in no_decay_names)
        if family == "gpt2":
            assert any(n.endswith("bias") for n in no_decay_names)
        total = sum(1 for p in model.parameters() if p.requires_grad)
        assert len(decay["params"]) + len(no_decay["params"]) == total


def test_frozen_params_are_left_out_and_cpu_is_not_fused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in ids and id(model[0].bias) in ids
    assert (
        not opt.defaults.get("fused") and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    )
    # plain params
    opt2 = build_optimizer(list(model.parameters()), lr=1e-3)
    assert len(opt2.param_groups) == 1
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(nn.Sequential(), lr=1e-3)


def test_cosine_schedule_warmup_then_decay_to_min_lr():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW(
        [{"params": [p], "lr": 1e-3}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 2e-3}]
    )
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=20, min_lr=1e-4)
    lrs = []
    for _ in range(25):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    first = [lr[0] for lr in lrs]
    assert first[0] == pytest.approx(1e-3 / 4) and first[3] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(first[:3], first[1:4]))  # warm-up rises
    assert all(a >= b for a, b in zip(first[3:20], first[4:21]))  # then decays
    assert first[20] == pytest.approx(1e-4, abs=1e-12) and first[24] == pytest.approx(1e-4, abs=1e-12)
    assert lrs[20][1] == pytest.approx(1e-4, abs=1e-12)  # min_lr is absolute for every group
    mid = 4 + 8  # half-way through the decay
    assert first[mid] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5, rel=1e-9)


def test_cosine_factor_and_bad_arguments():
    assert cosine_lr_factor(0, 0, 10, 0.0) == 1.0
    assert cosine_lr_factor(10, 0, 10, 0.1) == pytest.approx(0.1)
    assert cosine_lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="min_lr"):
        cosine_schedule(opt, 0, 10, min_lr=1e-2)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(opt, 11, 10)


def test_clip_grad_norm_returns_pre_clip_norm_and_clips():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full_like(model.weight, 2.0)
    model.bias.grad = torch.full_like(model.bias, 2.0)
    expected = math.sqrt(8 * 4.0)
    norm = clip_grad_norm(model, max_norm=1.0)
    assert isinstance(norm, float) and norm == pytest.approx(expected)
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    # max_norm <= 0 only measures
    assert clip_grad_norm(model.parameters(), 0) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(nn.Linear(2, 2), 1.0) == 0.0  # no grads


def test_fused_follows_the_training_device_when_given():
    """A recipe builds AdamW before accelerate moves the model to the GPU: ``device`` decides, else the
    parameters' current place (the bug: the RM and SFT recipes got the unfused kernel on CUDA)."""
    model = nn.Linear(4, 2)
    assert build_optimizer(model, lr=1e-3, device=torch.device("cuda")).defaults["fused"] is True
    assert not build_optimizer(model, lr=1e-3, device="cpu").defaults.get("fused")
    assert not build_optimizer(model, lr=1e-3).defaults.get("fused")
