"""An actor job of 2 data-parallel ranks (gloo on CPU) against one critic server: each rank sends its
share, the server updates once per global batch, and ends where the local 2-rank update ends."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from rlhf_kit.losses import ValueLoss
from rlhf_kit.models import TokenValueModel
from rlhf_kit.ppo import ExperienceConfig, UpdateConfig, mean_over_ranks, ppo_update
from rlhf_kit.rollout import Rollout, RolloutBuffer
from rlhf_kit.serving import CriticRewardService, CriticServer, CriticServerError, RemoteCritic
from rlhf_kit.tiny import hh_texts, train_tokenizer
from tests.conftest import make_reward_model
from tests.gloo import spawn_ranks
from tests.unit.test_ppo import fake_generation

# per-rank mini-batch 2 (global 4) in micro-batches of 1, two epochs: 4 optimizer steps per global batch
UPD = UpdateConfig(mini_batch_size=2, micro_batch_size=1, ppo_epochs=2, max_grad_norm=1e9, train_actor=False)
SEEDS = (7, 8)  # each rank's RolloutBuffer seed


def share(tokenizer, rank: int) -> Rollout:
    """Rank ``rank``'s rollout: prompts of different widths on the two ranks (5 and 3 tokens)."""
    gen = fake_generation(tokenizer, p=5 if rank == 0 else 3, seed=rank)
    g = torch.Generator().manual_seed(100 + rank)
    shape = gen.response_mask.shape
    zeros = torch.zeros(shape)
    return Rollout(
        sequences=gen.sequences, attention_mask=gen.attention_mask, response_mask=gen.response_mask,
        logprobs=zeros, ref_logprobs=zeros, values=torch.randn(shape, generator=g), rewards=zeros,
        advantages=zeros, returns=torch.randn(shape, generator=g), scores=torch.zeros(shape[0]),
        finished=gen.finished,
    )  # fmt: skip


def critic_and_optimizer(tokenizer):
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4))
    # plain SGD: unlike Adam, its step scales with the gradient, so a wrong cross-rank weighting shows
    return critic, torch.optim.SGD(critic.parameters(), lr=0.05)


def _rank(rank: int) -> None:
    from rlhf_kit.training.fsdp import apply_fsdp2, full_state_dict
    from rlhf_kit.training.optim import clip_grad_norm

    tokenizer = train_tokenizer(hh_texts(1000), vocab_size=512)
    data = share(tokenizer, rank)
    # the actor job's critic update, sent to the server (both ranks at once: the server gathers them)
    remote = RemoteCritic(os.environ["TEST_CRITIC_SERVER"], timeout=120, retries=0)
    served = remote.train_rollout(data, UPD, seed=SEEDS[rank], rank=rank, world_size=2)
    # the same update made locally by the 2 ranks (FSDP2 averages the gradients)
    critic, _ = critic_and_optimizer(tokenizer)
    apply_fsdp2(critic)
    opt = torch.optim.SGD(critic.parameters(), lr=0.05)
    buf = RolloutBuffer(seed=SEEDS[rank])
    buf.set_data(data)
    local = ppo_update(None, critic, None, opt, buf, None, ValueLoss(0.2), UPD, ExperienceConfig(),
                       clip_grad=clip_grad_norm)  # fmt: skip
    local = mean_over_ranks(local)
    weights = full_state_dict(critic)
    if rank == 0:
        torch.save({"local": local, "served": served, "weights": weights}, os.environ["TEST_OUT"])


@pytest.mark.slow
def test_two_rank_actor_job_equals_the_local_two_rank_update(tokenizer, tmp_path, monkeypatch):
    critic, opt = critic_and_optimizer(tokenizer)
    service = CriticRewardService(critic, opt, None, ValueLoss(0.2))
    with CriticServer(service, gather_timeout=120) as server:
        monkeypatch.setenv("TEST_CRITIC_SERVER", server.url)
        monkeypatch.setenv("TEST_OUT", str(tmp_path / "out.pt"))
        spawn_ranks(_rank, str(tmp_path / "store"))
    out = torch.load(tmp_path / "out.pt")
    assert service.train_calls == 1  # one update for the global batch, not one per rank
    for key, value in out["local"].items():
        assert out["served"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    init = TokenValueModel(make_reward_model(tokenizer, seed=4)).state_dict()
    moved = False
    for name, p in critic.state_dict().items():
        torch.testing.assert_close(p, out["weights"][name], atol=2e-5, rtol=1e-4, msg=name)
        moved |= not torch.equal(p, init[name])
    assert moved


def test_a_global_batch_needs_every_rank_and_the_same_settings(tokenizer):
    critic, opt = critic_and_optimizer(tokenizer)
    service = CriticRewardService(critic, opt, None, ValueLoss(0.2))
    data = [share(tokenizer, r) for r in (0, 1)]
    with CriticServer(service, gather_timeout=0.5) as server:
        remote = RemoteCritic(server.url, retries=0)
        with pytest.raises(CriticServerError, match=r"/train failed \(504\): global batch incomplete: ranks "
                           r"\[1\] of 2 sent no share within 0.5 s"):  # fmt: skip
            remote.train_rollout(data[0], UPD, seed=0, rank=0, world_size=2)
        errors = []

        def rank0():
            try:
                remote.train_rollout(data[0], UPD, seed=0, rank=0, world_size=2)
            except CriticServerError as e:
                errors.append(e)

        thread = threading.Thread(target=rank0)
        thread.start()
        while server.app.round is None:  # rank 0's share is in
            thread.join(0.01)
        other = UpdateConfig(**{**UPD.__dict__, "ppo_epochs": 1})
        with pytest.raises(CriticServerError, match=r"\(400\): ValueError: rank 1 sent .*'ppo_epochs': 1.*other "
                           r"ranks of this global batch sent .*'ppo_epochs': 2"):  # fmt: skip
            remote.train_rollout(data[1], other, seed=0, rank=1, world_size=2)
        thread.join()
        assert errors and errors[0].status == 504  # rank 0 alone: the round expires
        with pytest.raises(CriticServerError, match=r"rank 2 is not in \[0, world_size 2\)"):
            remote.train_rollout(data[1], UPD, seed=0, rank=2, world_size=2)
    assert service.train_calls == 0
