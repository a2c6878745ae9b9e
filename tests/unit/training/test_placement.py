import pytest
import torch

from rlhf_kit.models import TokenValueModel
from rlhf_kit.training.hf import make_accelerator
from rlhf_kit.training.placement import OptimSettings, place_models
from tests.conftest import make_causal_lm, make_reward_model


def _place(tokenizer, **kw):
    actor, critic = make_causal_lm(tokenizer, seed=1), TokenValueModel(make_reward_model(tokenizer, seed=2))
    trainable = {
        "actor": (actor, OptimSettings(lr=1e-3, min_lr=1e-4, weight_decay=0.1)),
        "critic": (critic, OptimSettings(lr=5e-3, min_lr=0.0)),
    }
    return place_models(make_accelerator("no"), trainable, [None], warmup_steps=1, total_steps=4, **kw)


def test_place_models_builds_named_optimizers_and_schedules(tokenizer):
    placed = _place(tokenizer)
    assert list(placed.models) == list(placed.optimizers) == list(placed.schedulers) == ["actor", "critic"]
    assert not placed.sharded
    lrs = {n: [g["lr"] for g in o.param_groups] for n, o in placed.optimizers.items()}
    assert (
        lrs["actor"] == [pytest.approx(1e-3)] * 2 and lrs["critic"] == [pytest.approx(5e-3)] * 2
    )  # warm-up 1
    decay = [g["weight_decay"] for g in placed.optimizers["actor"].param_groups]
    assert decay == [0.1, 0.0]
    # one update through the returned backward/clip moves the actor
    actor = placed.models["actor"]
    before = next(actor.parameters()).detach().clone()
    ids = torch.randint(3, 400, (2, 8))
    placed.backward(actor(input_ids=ids).logits.float().logsumexp(-1).mean())
    assert placed.clip_grad(actor, 1.0) > 0
    placed.optimizers["actor"].step()
    assert not torch.equal(before, next(actor.parameters()))
    for _ in range(2):
        placed.schedulers["critic"].step()
    assert placed.schedulers["critic"].get_last_lr()[0] < 5e-3  # cosine decay after the warm-up


def test_master_weights_cast_models_and_clip_the_masters(tokenizer):
    placed = _place(tokenizer, master_weights=True)
    actor = placed.models["actor"]
    assert all(p.dtype == torch.bfloat16 for p in actor.parameters())
    ids = torch.randint(3, 400, (2, 8))
    placed.backward(actor(input_ids=ids).logits.float().logsumexp(-1).mean())
    assert all(p.grad is None for p in actor.parameters())  # the gradients went to the fp32 masters
    from rlhf_kit.training.precision import grad_holder

    assert placed.clip_grad(grad_holder(actor, placed.optimizers["actor"]), 1.0) > 0


def test_compiled_blocks_train_like_eager(tokenizer):
    """compile_blocks=True compiles every block of the trainable and frozen models in place; one step
    of the compiled actor equals one step of the eager actor."""
    from rlhf_kit.models.compile import decoder_blocks

    frozen = make_reward_model(tokenizer, seed=5)
    eager = _place(tokenizer)
    compiled = _place(tokenizer, compile_blocks=True, compile_kwargs={"backend": "aot_eager"})
    ids = torch.randint(3, 400, (2, 8))
    for placed in (eager, compiled):
        actor = placed.models["actor"]
        placed.backward(actor(input_ids=ids).logits.float().logsumexp(-1).mean())
        placed.optimizers["actor"].step()
    assert all(b._compiled_call_impl is not None for b in decoder_blocks(compiled.models["actor"]))
    assert all(b._compiled_call_impl is None for b in decoder_blocks(eager.models["actor"]))
    for p, q in zip(eager.models["actor"].parameters(), compiled.models["actor"].parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    # frozen models are compiled too
    place_models(make_accelerator("no"), {"a": (make_causal_lm(tokenizer), OptimSettings(1e-3))}, [frozen],
                 warmup_steps=0, total_steps=1, compile_blocks=True, compile_kwargs={"backend": "aot_eager"})  # fmt: skip
    assert all(b._compiled_call_impl is not None for b in decoder_blocks(frozen))
