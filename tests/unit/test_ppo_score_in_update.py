"""``ExperienceConfig.score_in_update``: scoring skips the actor's and the critic's forward passes, and the
update computes old log-probs, values, rewards and advantages itself, from its own forward when the rollout
is one micro-batch. The same weights and statistics as scoring first (float64), with the KL penalty in
the reward; two forward passes fewer; refused where it would be wrong."""

import copy
import dataclasses
import functools

import pytest
import torch

from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
from rlhf_kit.models.compile import decoder_blocks
from rlhf_kit.ppo import (
    ExperienceConfig,
    RewardModelScorer,
    UpdateConfig,
    advantages_now_or_in_update,
    compute_advantages,
    make_experience,
    ppo_update,
)
from rlhf_kit.rollout import RolloutBuffer
from tests.unit.test_ppo import fake_generation, four_models  # noqa: F401  (a fixture)

BASE = ExperienceConfig(temperature=0.8, missing_eos_penalty=-1.0)
IN_UPDATE = dataclasses.replace(BASE, score_in_update=True)
KL = 0.05


def _update(actor, critic, rollout, exp_cfg, micro=4, epochs=1, tokens=0):
    # the recipe's callable: with score_in_update its statistics stay on the device until the update reads them
    _, _, advantages = advantages_now_or_in_update(rollout, KL, exp_cfg)
    buf = RolloutBuffer(seed=0)
    buf.append(rollout)
    return ppo_update(
        actor, critic, torch.optim.AdamW(actor.parameters(), lr=1e-3),
        torch.optim.AdamW(critic.parameters(), lr=1e-3), buf, PPOPolicyLoss(0.2, entropy_coef=0.01),
        ValueLoss(0.2), UpdateConfig(mini_batch_size=4, micro_batch_size=micro, ppo_epochs=epochs,
                                     max_grad_norm=1e9, micro_batch_tokens=tokens),
        exp_cfg, advantages=advantages or functools.partial(compute_advantages, kl_coef=KL, cfg=exp_cfg),
    )  # fmt: skip


def _counting(*models):
    """Forward passes of each model, counted at its first transformer block."""
    calls = {id(m): 0 for m in models}

    def counter(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    for m in models:
        decoder_blocks(m)[0].register_forward_hook(counter(id(m)))
    return calls


@pytest.mark.parametrize("micro, tokens", [(4, 0), (4, 88), (2, 0), (4, 14), (4, 44)])
def test_scoring_in_the_update_equals_scoring_first(tokenizer, four_models, micro, tokens):  # noqa: F811
    """micro 4, or a budget of twice the rollout's 44 padded tokens: one micro-batch, scored by the update's
    own forward (the ratio exactly 1); micro 2 and a 14-token budget: more than one, and a 44-token budget:
    one, but the two models' activations would not fit it; so the update scores the mini-batch first."""
    actor, ref, critic, rm = (m.double() for m in four_models)
    gen, scorer = fake_generation(tokenizer), RewardModelScorer(rm)
    first, first_stats = compute_advantages(make_experience(gen, actor, ref, critic, scorer, BASE), KL, BASE)
    a1, c1 = copy.deepcopy(actor), copy.deepcopy(critic)
    s1 = _update(a1, c1, first, BASE, micro, tokens=tokens)

    a2, c2 = copy.deepcopy(actor), copy.deepcopy(critic)
    calls = _counting(a2, c2)
    deferred = make_experience(gen, a2, ref, c2, scorer, IN_UPDATE)
    assert calls == {id(a2): 0, id(c2): 0}  # scoring ran neither
    assert torch.equal(deferred.logprobs, deferred.ref_logprobs) and not deferred.values.any()  # placeholders
    s2 = _update(a2, c2, deferred, IN_UPDATE, micro, tokens=tokens)
    assert all(type(v) in (float, int) for v in s2.values()), s2  # read once, at the update's end
    fused = micro == 4 and tokens in (0, 88)
    passes = 1 if fused else 1 + {2: 2, 14: 3, 44: 1}[tokens or micro]  # scoring's pass + the update's
    assert calls == {id(a2): passes, id(c2): passes}

    for p1, p2 in zip([*a1.parameters(), *c1.parameters()], [*a2.parameters(), *c2.parameters()]):
        torch.testing.assert_close(p2, p1, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(next(a2.parameters()), next(actor.parameters()))  # it did train
    for k in ("kl/seq_mean", "reward/score_mean", "reward/shaped_return_mean"):
        assert s2[k] == pytest.approx(first_stats[k], rel=1e-8, abs=1e-12), k
    # summed in float32, over the rows in the update's (length-sorted) order: the whitened advantages' std is
    # 1 to float32's precision either way (its last bit depends on the machine's summation kernels: 1.0 on
    # earlier sessions' machines, 0.99999994 on an AMD EPYC)
    assert s2["advantages/std"] == pytest.approx(first_stats["advantages/std"], rel=1e-6)
    assert s2["values/explained_variance"] == pytest.approx(
        first_stats["values/explained_variance"], rel=1e-5
    )
    assert abs(s2["kl/seq_mean"]) > 1e-3  # actor and reference differ: the KL penalty is a real one
    for k in ("policy/loss", "value/loss", "policy/grad_norm", "value/grad_norm", "policy/ratio_mean"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-8), k
    if fused:
        assert s2["policy/ratio_mean"] == 1.0 and s2["value/clip_fraction"] == 0.0


def test_refused_where_it_is_not_exact(tokenizer, four_models):  # noqa: F811
    actor, ref, critic, rm = four_models
    gen = fake_generation(tokenizer)
    r = make_experience(gen, actor, ref, critic, RewardModelScorer(rm), IN_UPDATE)
    with pytest.raises(ValueError, match="one optimizer step per rollout"):
        _update(copy.deepcopy(actor), copy.deepcopy(critic), r, IN_UPDATE, epochs=2)
    buf = RolloutBuffer(seed=0)
    buf.append(r)
    with pytest.raises(ValueError, match="needs advantages="):
        ppo_update(actor, critic, torch.optim.SGD(actor.parameters()), torch.optim.SGD(critic.parameters()),
                   buf, PPOPolicyLoss(0.2), ValueLoss(0.2), UpdateConfig(mini_batch_size=4), IN_UPDATE)  # fmt: skip
    with pytest.raises(ValueError, match="gae estimator"):
        dataclasses.replace(IN_UPDATE, advantage_estimator="grpo", group_size=2)
    with pytest.raises(ValueError, match="not the sampler"):
        dataclasses.replace(IN_UPDATE, old_logprobs="sampler")
    with pytest.raises(ValueError, match="critic server"):
        make_experience(gen, actor, ref, None, RewardModelScorer(rm), IN_UPDATE, remote=object())


def _two_rank_body(rank: int) -> None:
    """Rank 0 holds 4 samples (44 padded tokens), rank 1 three (33): under a 70-token budget only rank 1's
    micro-batch fits twice. Both must take the same path (scoring first, 2 passes per model), or a sharded
    model's collectives would come in a different order on each rank."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from rlhf_kit.models import TokenValueModel

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)  # fmt: skip
    actor, ref = (torch.manual_seed(s) and AutoModelForCausalLM.from_config(cfg).double() for s in (1, 2))
    cfg.num_labels = 1
    torch.manual_seed(3)
    critic = TokenValueModel(AutoModelForSequenceClassification.from_config(cfg).double())
    gen = fake_generation(SimpleNamespace(pad_token_id=0, eos_token_id=1), b=4 - rank, seed=rank)
    scorer = lambda seq, am, prompt_length, response_mask: seq.float().mean(-1)  # noqa: E731
    r = make_experience(gen, actor, ref, critic, scorer, IN_UPDATE)
    calls = _counting(actor, critic)
    _update(actor, critic, r, IN_UPDATE, micro=4, tokens=70)
    assert calls == {id(actor): 2, id(critic): 2}, (rank, calls)


def test_every_rank_takes_the_same_path():
    import os
    import tempfile

    from tests.gloo import spawn_ranks

    with tempfile.TemporaryDirectory() as d:
        spawn_ranks(_two_rank_body, os.path.join(d, "store"), world=2)


def test_scoring_in_the_update_on_a_real_like_checkpoint(tmp_path):
    """The four models loaded as the recipe loads them from a checkpoint set up like a real one (bf16
    weights, pad == EOS so responses are right padded with EOS, a config pad id unlike the tokenizer's,
    attention dropout in the config): one micro-batch scored by the update equals scoring first."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_kit.ppo import load_ppo_models
    from rlhf_kit.tiny import save_real_like_checkpoint

    path = save_real_like_checkpoint(str(tmp_path / "actor"), pad="eos")
    critic_dir = str(tmp_path / "critic")
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).save_pretrained(critic_dir)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token_id == tok.eos_token_id and len(tok) > 500  # fake_generation's ids fit
    models = load_ppo_models(path, critic_dir, path, tok)
    gen, scorer = fake_generation(tok), RewardModelScorer(models.reward_model)
    first, first_stats = compute_advantages(make_experience(gen, models.actor, models.reference, models.critic, scorer, BASE), KL, BASE)  # fmt: skip
    a1, c1 = copy.deepcopy(models.actor), copy.deepcopy(models.critic)
    s1 = _update(a1, c1, first, BASE)
    a2, c2 = copy.deepcopy(models.actor), copy.deepcopy(models.critic)
    s2 = _update(a2, c2, make_experience(gen, a2, models.reference, c2, scorer, IN_UPDATE), IN_UPDATE)
    for k in ("policy/loss", "value/loss", "policy/grad_norm", "value/grad_norm"):
        assert s2[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), k
    assert s2["kl/seq_mean"] == pytest.approx(first_stats["kl/seq_mean"], rel=1e-4, abs=1e-6)
    assert s2["policy/ratio_mean"] == 1.0
    for p1, p2 in zip([*a1.parameters(), *c1.parameters()], [*a2.parameters(), *c2.parameters()]):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5)
