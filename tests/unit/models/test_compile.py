import copy

import pytest
import torch

from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.models import TokenValueModel
from rlhf_kit.models.compile import compile_blocks, decoder_blocks, dependent_launch, recompile_limit_setting
from rlhf_kit.models.value import response_values
from tests.conftest import make_causal_lm, make_reward_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_blocks_match_eager_forward_and_backward(tokenizer, family):
    eager = make_causal_lm(tokenizer, family, seed=2)
    compiled = copy.deepcopy(eager)
    n = compile_blocks(compiled, backend="aot_eager")
    assert n == eager.config.num_hidden_layers
    assert all(b._compiled_call_impl is not None for b in decoder_blocks(compiled))
    assert all(b._compiled_call_impl is None for b in decoder_blocks(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in PPO
    for width in (14, 10):  # a second shape recompiles the block, it must still agree
        a = sequence_logprobs(eager, ids[:, :width], mask[:, :width], 6)
        b = sequence_logprobs(compiled, ids[:, :width], mask[:, :width], 6)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_blocks_are_found_through_the_critic_wrapper(tokenizer):
    critic = TokenValueModel(make_reward_model(tokenizer, seed=3))
    blocks = decoder_blocks(critic)
    assert blocks is critic.model.model.layers
    ref = copy.deepcopy(critic)
    compile_blocks(critic, backend="aot_eager")
    ids = torch.randint(3, 400, (2, 9))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(response_values(critic, ids, mask, 4), response_values(ref, ids, mask, 4))


def test_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no ModuleList"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_dependent_launch_only_on_hopper_and_later_and_never_over_the_callers_choice(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dependent_launch(cpu, {"dynamic": False}) == {"dynamic": False}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert dependent_launch(cuda, {"dynamic": False}) == {
        "dynamic": False,
        "options": {"triton.enable_pdl": True},
    }
    # the caller's own options are kept, and its choice of the setting wins
    got = dependent_launch(cuda, {"options": {"max_autotune": True, "triton.enable_pdl": False}})
    assert got == {"options": {"triton.enable_pdl": False, "max_autotune": True}}
    assert dependent_launch(cuda, {"mode": "max-autotune"}) == {
        "mode": "max-autotune"
    }  # compile takes one of them
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: (8, 0)
    )  # A100: no such launch
    assert dependent_launch(cuda, {}) == {}


@pytest.fixture
def dynamo_at_defaults():
    """Dynamo with no compiled entries, its default recompile limit (other tests may have raised it) and a
    limit hit made an error instead of a silent eager fallback."""
    import torch._dynamo

    torch._dynamo.reset()
    # config.patch, not monkeypatch: pytest's undo deletes a torch config entry instead of restoring it
    with torch._dynamo.config.patch({recompile_limit_setting(): 8, "fail_on_recompile_limit_hit": True}):
        yield
    torch._dynamo.reset()


def test_hf_generation_runs_compiled_blocks_eagerly(left_tokenizer, dynamo_at_defaults):
    """HF's dynamic-cache decoding would compile the shared block once per layer index and per cache
    length (and spend the recompile limit); the HF backend runs it eagerly: nothing compiles, same tokens."""
    from rlhf_kit.generation import HFBackend, SamplingParams
    from rlhf_kit.training.metrics import compile_stats

    eager = make_causal_lm(left_tokenizer, seed=4)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="eager")
    enc = left_tokenizer(["Human: hi\n\nAssistant:", "Human: how do I boil an egg?\n\nAssistant:"],
                         return_tensors="pt", padding=True)  # fmt: skip
    params = SamplingParams(max_new_tokens=8, greedy=True)
    frames = compile_stats().get("compile/frames", 0.0)
    out = HFBackend(compiled).generate(enc.input_ids, enc.attention_mask, params)
    assert compile_stats().get("compile/frames", 0.0) == frames
    ref = HFBackend(eager).generate(enc.input_ids, enc.attention_mask, params)
    assert torch.equal(out.sequences, ref.sequences)
    sequence_logprobs(compiled, out.sequences, out.attention_mask, out.prompt_length)  # scoring compiles
    assert compile_stats()["compile/frames"] > frames


def test_ppo_passes_of_four_compiled_models_stay_within_the_recompile_limit(left_tokenizer, dynamo_at_defaults):
    """PPO's calls at three batch shapes: HF generation, scoring without gradients by actor, reference,
    critic and reward model, then the actor's and critic's passes with gradients. All their blocks run one
    code object; at Dynamo's default limit of 8 entries the later variants ran eagerly (an error here)."""
    from rlhf_kit.generation import HFBackend, SamplingParams
    from rlhf_kit.models.reward import reward_scores

    actor = make_causal_lm(left_tokenizer, seed=0).train()
    ref = copy.deepcopy(actor).eval().requires_grad_(False)
    critic = TokenValueModel(make_reward_model(left_tokenizer, seed=1)).train()
    rm = make_reward_model(left_tokenizer, seed=2).eval().requires_grad_(False)
    for m in (actor, ref, critic, rm):
        compile_blocks(m, backend="eager")
    prompts = ["Human: hi\n\nAssistant:", "Human: what is a good name for a cat?\n\nAssistant:", "Human: why?"]
    for rows, new in ((3, 6), (2, 9), (3, 4)):
        enc = left_tokenizer(prompts[:rows], return_tensors="pt", padding=True)
        out = HFBackend(actor).generate(enc.input_ids, enc.attention_mask, SamplingParams(new, seed=rows))
        args = (out.sequences, out.attention_mask, out.prompt_length)
        with torch.no_grad():
            old = sequence_logprobs(actor, *args)
            sequence_logprobs(ref, *args), response_values(critic, *args), reward_scores(rm, *args[:2])
        logprobs, values = sequence_logprobs(actor, *args), response_values(critic, *args)
        torch.testing.assert_close(logprobs.detach(), old)
        (logprobs.sum() + values.sum()).backward()
