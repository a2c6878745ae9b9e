"""The PPO update on 2 gloo ranks with FSDP2-sharded actor and critic equals one process on the whole
batch: token counts, advantage whitening and gradient averaging all work across ranks."""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
from rlhf_kit.models import TokenValueModel
from rlhf_kit.ppo import (
    ExperienceConfig,
    RewardModelScorer,
    UpdateConfig,
    compute_advantages,
    make_experience,
    ppo_update,
)
from rlhf_kit.rollout import RolloutBuffer
from rlhf_kit.tiny import hh_texts, train_tokenizer
from rlhf_kit.training.optim import clip_grad_norm
from tests.conftest import make_causal_lm, make_reward_model
from tests.gloo import spawn_ranks
from tests.unit.test_ppo import fake_generation

EXP = ExperienceConfig(temperature=0.9, normalize_advantages=True)
UPD = UpdateConfig(micro_batch_size=1, ppo_epochs=2, max_grad_norm=1e9)


def _models(tok):
    actor = make_causal_lm(tok, seed=1)
    critic = TokenValueModel(make_reward_model(tok, seed=4))
    return actor, critic


def _rollout(tok):
    actor, critic = _models(tok)
    ref = make_causal_lm(tok, seed=2)
    rm = make_reward_model(tok, seed=3)
    gen = fake_generation(tok)
    return make_experience(gen, actor, ref, critic, RewardModelScorer(rm), EXP)


def _train(actor, critic, rollout, mini):
    # plain SGD: unlike Adam, its step scales with the gradient, so a wrong cross-rank scale shows
    a_opt = torch.optim.SGD(actor.parameters(), lr=0.5)
    c_opt = torch.optim.SGD(critic.parameters(), lr=0.5)
    data, _ = compute_advantages(rollout, 0.05, EXP)  # whitening: global statistics when distributed
    buf = RolloutBuffer(seed=0)
    buf.set_data(data)
    upd = UpdateConfig(mini_batch_size=mini, micro_batch_size=UPD.micro_batch_size, ppo_epochs=UPD.ppo_epochs,
                       max_grad_norm=UPD.max_grad_norm)  # fmt: skip
    ppo_update(
        actor,
        critic,
        a_opt,
        c_opt,
        buf,
        PPOPolicyLoss(0.2, 0.01),
        ValueLoss(0.2),
        upd,
        EXP,
        clip_grad=clip_grad_norm,
    )


def _worker(out_dir, rank):
    from rlhf_kit.training.fsdp import apply_fsdp2, full_state_dict

    tok = train_tokenizer(hh_texts(1000), vocab_size=512)
    rollout = _rollout(tok)[rank * 2 : rank * 2 + 2]  # each rank holds half of the samples
    actor, critic = _models(tok)
    apply_fsdp2(actor)
    apply_fsdp2(critic)
    _train(actor, critic, rollout, mini=2)
    a, c = full_state_dict(actor), full_state_dict(critic)
    if rank == 0:
        torch.save({"actor": a, "critic": c}, os.path.join(out_dir, "sharded.pt"))


def test_fsdp2_two_ranks_equal_single_process(tokenizer, tmp_path):
    # tests/gloo.py: each rank leaves without the interpreter's teardown, where gloo's threads aborted a
    # finished rank now and then ("terminate called without an active exception"; a fresh-clone CI run)
    spawn_ranks(functools.partial(_worker, str(tmp_path)), str(tmp_path / "store"))
    sharded = torch.load(tmp_path / "sharded.pt")
    actor, critic = _models(tokenizer)
    init = {k: v.clone() for k, v in actor.state_dict().items()}
    _train(actor, critic, _rollout(tokenizer), mini=4)
    for name, p in actor.state_dict().items():
        torch.testing.assert_close(sharded["actor"][name], p, atol=2e-5, rtol=1e-4, msg=name)
    for name, p in critic.state_dict().items():
        torch.testing.assert_close(sharded["critic"][name], p, atol=2e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(init[k], v) for k, v in actor.state_dict().items())


def _adaptive_kl_rank(rank: int) -> None:
    from rlhf_kit.kl import AdaptiveKLController
    from rlhf_kit.rollout import Rollout

    # rank 0's sequences drift 0.1 nats a token from the reference, rank 1's 0.3: the controller must
    # see the mean over both (0.2 x 3 tokens = 0.6 per sequence) on every rank
    b, n = 4, 3
    z = torch.zeros(b, n)
    logprobs = torch.full((b, n), -1.0)
    r = Rollout(
        sequences=torch.ones(b, 2 + n, dtype=torch.long), attention_mask=torch.ones(b, 2 + n, dtype=torch.long),
        response_mask=torch.ones(b, n, dtype=torch.long), logprobs=logprobs, ref_logprobs=logprobs - (0.1 + 0.2 * rank),
        values=z, rewards=z, advantages=z, returns=z, scores=torch.zeros(b), finished=torch.ones(b, dtype=torch.bool),
    )  # fmt: skip
    _, stats = compute_advantages(r, 0.1, ExperienceConfig())
    assert abs(stats["kl/seq_mean"] - 0.6) < 1e-6, stats["kl/seq_mean"]
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(stats["kl/seq_mean"], 8)
    values = [None, None]
    dist.all_gather_object(values, ctl.value)
    assert values[0] == values[1], values


def test_adaptive_kl_controller_sees_the_kl_of_all_ranks(tmp_path):
    spawn_ranks(_adaptive_kl_rank, str(tmp_path / "store"))


def _token_budget_rank(rank: int) -> None:
    from rlhf_kit.ppo.update import UpdateConfig, _micro_batches
    from tests.unit.test_rollout import make_rollout

    # rank 0's two samples fit one budget together (2 x 6 columns <= 12); rank 1's need two micro-batches
    r = make_rollout(2, 2, 8, fill=1, resp_len=[4, 3] if rank == 0 else [8, 7])
    parts = _micro_batches(r, UpdateConfig(micro_batch_size=2, micro_batch_tokens=12))
    counts = [None, None]
    dist.all_gather_object(counts, len(parts))
    assert counts == [2, 2], counts  # rank 0 splits too: FSDP2 needs the same passes on every rank
    assert sorted(i for p, _ in parts for i in p.scores.tolist()) == [1.0, 1.0]


def test_token_budget_gives_every_rank_the_same_number_of_micro_batches(tmp_path):
    spawn_ranks(_token_budget_rank, str(tmp_path / "store"))
