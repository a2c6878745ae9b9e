import copy
import functools
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM

from rlhf_kit.tiny import FAMILIES, tiny_config
from rlhf_kit.training.fsdp import apply_fsdp2, find_decoder_layers, full_state_dict, is_sharded
from tests.conftest import make_causal_lm, make_reward_model
from tests.gloo import spawn_ranks

VOCAB = 96


def test_find_decoder_layers_for_every_family(tokenizer):
    from peft import LoraConfig, get_peft_model

    for family in FAMILIES:
        for make in (make_causal_lm, make_reward_model):
            model = make(tokenizer, family)
            layers = find_decoder_layers(model)
            assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    lora = get_peft_model(make_causal_lm(tokenizer, "llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(find_decoder_layers(lora)) == 2
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        find_decoder_layers(nn.Linear(2, 2))
    assert not is_sharded(nn.Linear(2, 2))


# The comparison runs in float64. In float32 the gradients of the two layouts differ by reduction order
# (~1e-8), and AdamW's m / (sqrt(v) + eps) amplifies that for elements whose gradient is near eps: the
# step-2 weights then differ by 2e-6 on one CPU and 1.3e-5 on another, so no fixed float32 tolerance is
# both safe and tight. In float64 the layouts agree to ~1e-15, while a wrong gradient scale between
# ranks (a factor of 2) moves gradients by ~0.1 and step-2 weights by ~0.04.
DTYPE = torch.float64


def _assert_close(a, b, what, atol=1e-10):
    assert torch.allclose(a, b, atol=atol, rtol=1e-8), f"{what}: max diff {(a - b).abs().max().item()}"


def _worker(store: str, rank: int) -> None:
    try:
        from rlhf_kit.training.checkpoint import load_checkpoint, save_checkpoint
        from rlhf_kit.training.optim import build_optimizer, clip_grad_norm

        torch.manual_seed(0)
        ref = AutoModelForCausalLM.from_config(
            tiny_config("llama", VOCAB, hidden_size=32, intermediate_size=64)
        ).to(DTYPE)
        model = apply_fsdp2(copy.deepcopy(ref))
        assert is_sharded(model) and type(find_decoder_layers(model)[0]).__name__.startswith("FSDP")
        ref_opt = build_optimizer(ref, lr=1e-2, weight_decay=0.1)
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)

        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(3, VOCAB, (4, 12), generator=g) for _ in range(2)]

        def step(m, o, ids):  # ids: (b, t); every rank holds the full batch and takes its half
            if m is not ref:
                ids = ids[2 * rank : 2 * rank + 2]
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            norm = clip_grad_norm(m, 0.5)
            o.step()
            o.zero_grad(set_to_none=False)
            return loss.detach(), norm

        # 1) one step: the same loss, gradients, clip norm and updated weights as the unsharded model
        ids = batches[0]
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        loss = model(input_ids=ids[2 * rank : 2 * rank + 2], labels=ids[2 * rank : 2 * rank + 2]).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        # HF's causal-LM loss upcasts logits with .float(), so the loss itself is float32
        _assert_close(mean_loss / 2, ref_loss.detach(), "loss", atol=1e-6)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            _assert_close(p.grad.full_tensor(), ref_params[name].grad, f"grad {name}")
        norm, ref_norm = clip_grad_norm(model, 0.5), clip_grad_norm(ref, 0.5)
        assert isinstance(norm, float) and abs(norm - ref_norm) < 1e-9 * ref_norm
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        sd = full_state_dict(model)
        if rank == 0:
            ref_sd = ref.state_dict()
            assert set(sd) == set(ref_sd)
            for k, v in sd.items():
                assert v.device.type == "cpu"
                _assert_close(v, ref_sd[k], f"weight {k}")
        else:
            assert sd == {}

        # 2) checkpoint collective save, load into a fresh sharded model + optimizer, continue identically
        ck = os.path.join(os.path.dirname(store), "ck")
        save_checkpoint(ck, 1, models={"m": model}, optimizers={"m": opt}, extra={"pos": 1})
        torch.manual_seed(5)
        fresh = apply_fsdp2(AutoModelForCausalLM.from_config(ref.config).to(DTYPE))
        fresh_opt = build_optimizer(fresh, lr=1e-2, weight_decay=0.1)
        step_no, extra = load_checkpoint(ck, models={"m": fresh}, optimizers={"m": fresh_opt})
        assert step_no == 1 and extra == {"pos": 1}
        step(model, opt, batches[1])
        step(fresh, fresh_opt, batches[1])
        step(ref, ref_opt, batches[1])
        a, b = full_state_dict(model), full_state_dict(fresh)
        if rank == 0:
            ref_sd = ref.state_dict()
            for k in a:
                assert torch.equal(a[k], b[k]), f"resumed weight {k} differs"
                _assert_close(a[k], ref_sd[k], f"step-2 weight {k}")
    finally:
        dist.barrier()


@pytest.mark.slow
def test_fsdp2_two_gloo_ranks_match_unsharded(tmp_path):
    # tests/gloo.py: the group, faulthandler, and each rank's exit without the interpreter's teardown (where
    # gloo's threads have aborted finished ranks: "terminate called without an active exception")
    store = str(tmp_path / "store")
    spawn_ranks(functools.partial(_worker, store), store)
