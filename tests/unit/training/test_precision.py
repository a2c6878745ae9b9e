import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_kit.training.optim import build_optimizer, clip_grad_norm
from rlhf_kit.training.precision import build_master_weight_optimizer, grad_holder
from tests.conftest import make_causal_lm


def _batches(tokenizer, n=4, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tokenizer), (b, t), generator=g) for _ in range(n)]


def _train(model, opt, batches, accumulation=2, clip=None):
    """Steps of ``accumulation`` micro-batches each; LM loss in fp32."""
    norms = []
    for i, ids in enumerate(batches):
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            if clip is not None:
                norms.append(clip_grad_norm(grad_holder(model, opt), clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return norms


def test_fp32_master_weights_equal_plain_adamw_with_accumulation_and_clipping(tokenizer):
    """dtype=float32 makes the masters exact copies: the hooks (accumulate into the master's grad, free
    the model's) and the step hook (copy back) must then reproduce plain AdamW bit for bit."""
    plain = make_causal_lm(tokenizer, seed=3).train()
    master = copy.deepcopy(plain)
    batches = _batches(tokenizer)
    n1 = _train(plain, build_optimizer(plain, 1e-2, 0.1), batches, clip=0.5)
    opt = build_master_weight_optimizer(master, 1e-2, 0.1, dtype=torch.float32)
    n2 = _train(master, opt, batches, clip=0.5)
    assert n1 == n2 and n1[0] > 0.5  # clipping was active
    for (name, p1), p2 in zip(plain.named_parameters(), master.parameters()):
        torch.testing.assert_close(p1, p2, atol=0, rtol=0, msg=name)
    assert all(p.grad is None for p in master.parameters())  # grads live on the masters only


def test_bf16_params_follow_fp32_masters_that_keep_small_updates(tokenizer):
    model = make_causal_lm(tokenizer, seed=4).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_master_weight_optimizer(model, 1e-5, 0.0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in opt.master_weights)
    _train(model, opt, _batches(tokenizer, n=6))
    moved_master, moved_bf16 = 0, 0
    for (name, p), m in zip(model.named_parameters(), opt.master_weights):
        assert torch.equal(p, m.to(torch.bfloat16)), name
        moved_master += int((m != before[name]).sum())
        moved_bf16 += int((p.float() != before[name].to(torch.bfloat16).float()).sum())
    # 3 Adam steps of ~1e-5 each: the masters of every token seen moved, while most of those changes
    # are below bf16's resolution (a bf16-only optimizer would have lost them)
    n = sum(p.numel() for p in model.parameters())
    assert moved_master > 0.5 * n, (moved_master, n)
    assert 0 < moved_bf16 < 0.5 * moved_master, (moved_bf16, moved_master)


def test_state_dict_carries_masters_and_resume_is_exact(tokenizer):
    batches = _batches(tokenizer, n=8, seed=1)
    model = make_causal_lm(tokenizer, seed=5).train()
    opt = build_master_weight_optimizer(model, 1e-4, 0.01)
    _train(model, opt, batches[:4])
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert len(state["opt"]["master_weights"]) == len(opt.master_weights)
    _train(model, opt, batches[4:])

    resumed = make_causal_lm(tokenizer, seed=99).train()  # different weights: all must come from the state
    ropt = build_master_weight_optimizer(resumed, 1e-4, 0.01)
    resumed.load_state_dict(state["model"])
    ropt.load_state_dict(state["opt"])
    _train(resumed, ropt, batches[4:])
    for (name, p1), p2 in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p1, p2), name
    for m1, m2 in zip(opt.master_weights, ropt.master_weights):
        assert torch.equal(m1, m2)


def test_loading_a_plain_optimizer_state_is_refused(tokenizer):
    model = make_causal_lm(tokenizer, seed=6)
    plain_state = build_optimizer(copy.deepcopy(model), 1e-3).state_dict()
    opt = build_master_weight_optimizer(model, 1e-3)
    try:
        opt.load_state_dict(plain_state)
    except KeyError as e:
        assert "master_weights" in str(e)
    else:
        raise AssertionError("a state without master weights was accepted")


def test_grad_holder_looks_through_wrappers(tokenizer):
    model = make_causal_lm(tokenizer, seed=7)
    plain = build_optimizer(model, 1e-3)
    assert grad_holder(model, plain) is model and grad_holder(model, None) is model
    opt = build_master_weight_optimizer(model, 1e-3)

    class Wrapped:  # accelerate's AcceleratedOptimizer keeps the real one as .optimizer
        optimizer = opt

    assert grad_holder(model, Wrapped()) is opt.master_weights


class _CountOps(TorchDispatchMode):
    """The number of ATen operations run while active, views (no kernel, no copy) not counted."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def test_a_backward_moves_its_grads_to_the_masters_in_a_few_operations(tokenizer):
    """The masters' grads cost a few operations per backward pass, not a cast and an add per parameter
    (each from a Python hook on the thread that issues the backward's kernels); the model's own grads are
    freed at the end of each pass."""
    model = make_causal_lm(tokenizer, seed=8).train()
    plain = copy.deepcopy(model).to(torch.bfloat16)  # the same bf16 backward without master weights
    opt = build_master_weight_optimizer(model, 1e-3)
    n_params = len(opt.master_weights)
    for ids in _batches(tokenizer, n=3):  # the first pass makes the masters' grads, the later ones add
        counts = []
        for m in (plain, model):
            loss = m(input_ids=ids).logits.float().mean()
            with _CountOps() as c:
                loss.backward()
            counts.append(c.n)
        assert counts[1] - counts[0] <= 4 < n_params, (counts, n_params)
        assert all(p.grad is None for p in model.parameters())
        assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in opt.master_weights)
        plain.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_passes_that_reach_some_parameters_accumulate_exactly(tokenizer, checkpointing):
    """A pass through the LM head only, between two full passes: with fp32 masters (exact copies) every
    master's grad equals plain fp32 accumulation of the same three passes; also under gradient
    checkpointing (``use_reentrant`` True: backward passes nested in the outer one, and False)."""
    plain = make_causal_lm(tokenizer, seed=9).train()
    if checkpointing is not None:
        plain.gradient_checkpointing_enable({"use_reentrant": checkpointing})
        plain.config.use_cache = False
    master = copy.deepcopy(plain)
    opt = build_master_weight_optimizer(master, 1e-3, dtype=torch.float32)
    ids = _batches(tokenizer, n=1)[0]
    for m in (plain, master):
        for head_only in (False, True, False):
            if head_only:
                hidden = m.model(input_ids=ids).last_hidden_state.detach()
                loss = m.lm_head(hidden).float().square().mean()
            else:
                loss = m(input_ids=ids).logits.float().mean()
            loss.backward()
    for (name, p), g in zip(plain.named_parameters(), opt.master_weights):
        torch.testing.assert_close(p.grad, g.grad, atol=0, rtol=0, msg=name)
