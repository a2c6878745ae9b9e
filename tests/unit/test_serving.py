"""The critic server: HTTP on localhost (port 0, server thread) against the local PPO code path."""

from __future__ import annotations

import copy
import socket
import urllib.error
import urllib.request

import pytest
import torch

from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
from rlhf_kit.models import TokenValueModel, response_values, reward_scores
from rlhf_kit.ppo import (
    ExperienceConfig,
    RewardModelScorer,
    UpdateConfig,
    compute_advantages,
    make_experience,
    ppo_update,
)
from rlhf_kit.rollout import RolloutBuffer
from rlhf_kit.serving import (
    CriticRewardService,
    CriticServer,
    CriticServerError,
    RemoteCritic,
    connect_critic_server,
    encode,
)
from rlhf_kit.training.optim import cosine_schedule
from tests.conftest import make_causal_lm, make_reward_model
from tests.unit.test_ppo import fake_generation

EXP = ExperienceConfig(temperature=0.8, micro_batch_size=2)
# accumulation over micro-batches, two epochs, clipping active (grad norms are ~10 here), 4 optimizer steps
UPD = UpdateConfig(mini_batch_size=2, micro_batch_size=1, ppo_epochs=2, max_grad_norm=0.5)
LR, TOTAL = 1e-3, 8


@pytest.fixture
def models(tokenizer):
    actor = make_causal_lm(tokenizer, seed=1)
    ref = make_causal_lm(tokenizer, seed=2)
    rm = make_reward_model(tokenizer, seed=3)
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4))
    return actor, ref, critic, rm


@pytest.fixture
def rollouts(tokenizer, models):
    """Two rollouts (different generations) with advantages and returns, as one PPO step scores them."""
    actor, ref, critic, rm = models
    out = []
    for seed in (0, 1):
        r = make_experience(
            fake_generation(tokenizer, seed=seed), actor, ref, critic, RewardModelScorer(rm), EXP
        )
        out.append(compute_advantages(r, 0.05, EXP)[0])
    return out


def critic_optim(critic):
    opt = torch.optim.AdamW(critic.parameters(), lr=LR)
    return opt, cosine_schedule(opt, 1, TOTAL, min_lr=1e-4)


def make_service(critic, rm=None, **kw) -> CriticRewardService:
    opt, sched = critic_optim(critic)
    return CriticRewardService(critic, opt, sched, ValueLoss(0.2), rm, **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=name)


def test_remote_critic_training_equals_local_ppo_update(models, rollouts):
    """Local: ppo_update trains actor and critic together (the recipe's path). Split: ppo_update
    actor-only in this process, critic through RemoteCritic over HTTP. Both end with the same weights."""
    actor, _, critic, _ = models
    a_local, c_local = copy.deepcopy(actor), copy.deepcopy(critic)
    a_split, c_remote = copy.deepcopy(actor), copy.deepcopy(critic)
    a_opt_l, a_opt_s = (torch.optim.AdamW(a.parameters(), lr=LR) for a in (a_local, a_split))
    c_opt_l, c_sched_l = critic_optim(c_local)
    steps_per_rollout = UPD.ppo_epochs * 2  # 4 samples in mini-batches of 2
    losses = PPOPolicyLoss(0.2, 0.01), ValueLoss(0.2)
    split_cfg = UpdateConfig(**{**UPD.__dict__, "train_critic": False})
    with CriticServer(make_service(c_remote)) as server:
        remote = RemoteCritic(server.url)
        for step, r in enumerate(rollouts):
            buf = RolloutBuffer(seed=10 + step)
            buf.set_data(r)
            local = ppo_update(a_local, c_local, a_opt_l, c_opt_l, buf, *losses, UPD, EXP)
            for _ in range(steps_per_rollout):
                c_sched_l.step()
            buf = RolloutBuffer(seed=10 + step)
            buf.set_data(r)
            split = ppo_update(a_split, None, a_opt_s, None, buf, losses[0], None, split_cfg, EXP)
            assert not any(k.startswith("value/") for k in split)
            split |= remote.train_rollout(r, UPD, seed=10 + step)
            for key, value in local.items():
                assert split[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            assert split["lr/critic"] == pytest.approx(c_sched_l.get_last_lr()[0])
        assert remote.health()["train_calls"] == 2
    assert_same_weights(c_local, c_remote)
    assert_same_weights(a_local, a_split)
    # the updates did move the critic (so equality is not trivially "nothing happened")
    assert any(not torch.equal(p, q) for p, q in zip(c_remote.parameters(), critic.parameters()))


def test_wrong_seed_changes_the_result(models, rollouts):
    """The mini-batch order matters: the server with another seed ends elsewhere."""
    _, _, critic, _ = models
    a, b = make_service(copy.deepcopy(critic)), make_service(copy.deepcopy(critic))
    a.train_rollout(rollouts[0], UPD, seed=0)
    b.train_rollout(rollouts[0], UPD, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(a.critic.parameters(), b.critic.parameters()))


def test_service_training_runs_without_cudnn_sdpa(models, rollouts):
    from rlhf_kit.models.attention import cudnn_sdpa_enabled

    torch.backends.cuda.enable_cudnn_sdp(True)  # as a caller may leave it (restored by conftest)
    _, _, critic, _ = models
    svc = make_service(critic)
    seen = []
    hook = critic.register_forward_pre_hook(lambda *_: seen.append(cudnn_sdpa_enabled()))
    svc.train_rollout(rollouts[0], UPD, seed=0)
    hook.remove()
    assert len(seen) == 8 and not any(seen)  # 2 epochs x 4 micro-batches, all with cuDNN SDPA off
    assert cudnn_sdpa_enabled()


def test_infer_equals_local_values_and_scores(tokenizer, models):
    actor, ref, critic, rm = models
    gen = fake_generation(tokenizer)
    seq, am, rmask = gen.sequences, gen.attention_mask, gen.response_mask
    with CriticServer(
        make_service(copy.deepcopy(critic), copy.deepcopy(rm), infer_micro_batch_size=3)
    ) as server:
        remote = RemoteCritic(server.url)
        values, scores = remote.infer(seq, am, 5, rmask)
        assert values.shape == (4, 6) and scores.shape == (4,)
        with torch.no_grad():
            torch.testing.assert_close(values, response_values(critic, seq, am, 5))
            torch.testing.assert_close(scores, reward_scores(rm, seq, am))
        assert remote.infer(seq, am, 5, rmask, with_scores=False)[1] is None
        # make_experience through the server equals the local four-model scoring
        local = make_experience(gen, actor, ref, critic, RewardModelScorer(rm), EXP)
        served = make_experience(gen, actor, ref, None, None, EXP, remote=remote)
    for field in ("values", "scores", "logprobs", "ref_logprobs"):
        torch.testing.assert_close(getattr(served, field), getattr(local, field), msg=field)


def test_server_without_reward_model_leaves_scoring_to_the_scorer(tokenizer, models):
    actor, ref, critic, rm = models
    gen = fake_generation(tokenizer)
    svc = make_service(critic)  # no reward model
    assert svc.infer(gen.sequences, gen.attention_mask, 5, gen.response_mask)[1] is None
    r = make_experience(gen, actor, ref, None, RewardModelScorer(rm), EXP, remote=svc)
    torch.testing.assert_close(r.scores, reward_scores(rm, gen.sequences, gen.attention_mask))
    with pytest.raises(ValueError, match="no scorer given and the critic server has no reward model"):
        make_experience(gen, actor, ref, None, None, EXP, remote=svc)


def test_save_load_round_trip_resumes_exactly(tmp_path, tokenizer, models, rollouts):
    from transformers import AutoModelForSequenceClassification

    _, _, critic, _ = models
    with CriticServer(
        make_service(copy.deepcopy(critic), tokenizer=tokenizer, output_dir=tmp_path)
    ) as server:
        remote = RemoteCritic(server.url)
        remote.train_rollout(rollouts[0], UPD, seed=0)
        saved = remote.save("checkpoints/step_1")  # relative: under the server's output_dir
        assert saved == str(tmp_path / "checkpoints" / "step_1")
        uninterrupted = remote.train_rollout(rollouts[1], UPD, seed=1)
        expected = copy.deepcopy(server.service.critic)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "checkpoints" / "step_1" / "critic")
    assert (
        hf.config.num_labels == 1
        and (tmp_path / "checkpoints" / "step_1" / "critic" / "tokenizer.json").is_file()
    )
    # a fresh server (another initial critic) resumes from the checkpoint: the next update is identical
    fresh = TokenValueModel(make_reward_model(tokenizer, seed=9))
    with CriticServer(make_service(fresh, output_dir=tmp_path)) as server:
        remote = RemoteCritic(server.url)
        assert remote.load("checkpoints/step_1") == 1
        for name, p in hf.state_dict().items():  # the HF directory holds the step-1 weights
            torch.testing.assert_close(fresh.model.state_dict()[name], p, rtol=0, atol=0)
        resumed = remote.train_rollout(rollouts[1], UPD, seed=1)
    assert resumed == uninterrupted
    assert_same_weights(fresh, expected)


def test_save_keep_last_prunes_older_saves(tmp_path, models, rollouts):
    _, _, critic, _ = models
    svc = make_service(critic, output_dir=tmp_path)
    (tmp_path / "checkpoints" / "unrelated").mkdir(parents=True)
    for step in (1, 2, 3):
        svc.train_rollout(rollouts[0], UpdateConfig(mini_batch_size=4, micro_batch_size=4), seed=step)
        svc.save(f"checkpoints/step_{step}", keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3", "unrelated"]


def test_bad_requests_give_clear_client_errors(tmp_path, tokenizer, models):
    _, _, critic, rm = models
    gen = fake_generation(tokenizer)
    seq, am, rmask = gen.sequences, gen.attention_mask, gen.response_mask
    with CriticServer(make_service(critic, rm, output_dir=tmp_path)) as server:
        remote = RemoteCritic(server.url)
        with pytest.raises(
            CriticServerError, match=r"/infer failed \(400\): ValueError: attention_mask has shape"
        ):
            remote.infer(seq, am[:, 1:], 5, rmask)
        with pytest.raises(CriticServerError, match=r"/infer .*prompt_length 4 \+ response_mask width 6"):
            remote.infer(seq, am, 4, rmask)
        with pytest.raises(
            CriticServerError, match=r"/train .*values has shape \(3, 6\), expected \(4, 6\)"
        ) as e:
            remote.train(seq, am, rmask, torch.zeros(3, 6), torch.zeros(4, 6), 5, mini_batch_size=2,
                         micro_batch_size=1)  # fmt: skip
        assert e.value.endpoint == "/train" and e.value.status == 400 and "\n" not in str(e.value)
        with pytest.raises(CriticServerError, match=r"/train .*mini_batch_size must be a positive integer"):
            remote.train(
                seq, am, rmask, rmask.float(), rmask.float(), 5, mini_batch_size=0, micro_batch_size=1
            )
        with pytest.raises(CriticServerError, match=r"/load .*no critic server checkpoint at .*nonexistent"):
            remote.load("checkpoints/nonexistent")
        for bad in ("/tmp/elsewhere", "../outside"):  # requests stay inside the server's output dir
            with pytest.raises(CriticServerError, match=r"/save .*inside the server's --output-dir"):
                remote.save(bad)
        with pytest.raises(CriticServerError, match=r"/nope .*unknown endpoint /nope"):
            remote._call("/nope")
        request = urllib.request.Request(server.url + "/train", data=b"\x05", method="POST")
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(request, timeout=10)
        assert raw.value.code == 400 and b"shorter than its 8-byte header" in raw.value.read()
        request = urllib.request.Request(server.url + "/infer", data=encode({}), method="POST")
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(request, timeout=10)
        assert b"request has no tensor 'sequences'" in raw.value.read()
        assert remote.health()["ok"]  # still serving after the errors


def test_unreachable_or_silent_server_gives_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=f"cannot reach the critic server at {url}"):
        RemoteCritic(url, timeout=5, retries=0).health()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(TimeoutError, match=f"critic server {url} did not answer /health within 0.3 s"):
            RemoteCritic(url, timeout=0.3, retries=0).health()
    with pytest.raises(ValueError, match="must start with http://"):
        RemoteCritic("localhost:5567")


def test_connect_checks_the_server_fits_the_run(models):
    _, _, critic, rm = models
    svc = make_service(critic, info={"total_steps": TOTAL})
    with CriticServer(svc) as server:
        ok = dict(vocab_size=512, total_steps=TOTAL, value_clip=0.2, need_scores=False)
        remote, info = connect_critic_server(server.url, **ok)
        assert info["total_steps"] == TOTAL and not info["reward_model"]
        with pytest.raises(ValueError, match="has no reward model"):
            connect_critic_server(server.url, **{**ok, "need_scores": True})
        with pytest.raises(
            ValueError, match="has total_steps 8 but this run needs 4: start it with --total-steps 4"
        ):
            connect_critic_server(server.url, **{**ok, "total_steps": 4})
        with pytest.raises(ValueError, match="has value_clip 0.2 but this run needs 0.0"):
            connect_critic_server(server.url, **{**ok, "value_clip": 0.0})
        with pytest.raises(
            ValueError, match="critic_vocab_size 512 is smaller than the actor tokenizer's 600"
        ):
            connect_critic_server(server.url, **{**ok, "vocab_size": 600})
        remote.shutdown()  # the /shutdown endpoint stops the serving thread
        server._thread.join(timeout=10)
        assert not server._thread.is_alive()


def test_ppo_update_needs_the_critic_it_trains(models, rollouts):
    actor, _, _, _ = models
    buf = RolloutBuffer(seed=0)
    buf.set_data(rollouts[0])
    opt = torch.optim.AdamW(actor.parameters(), lr=LR)
    with pytest.raises(ValueError, match="training the critic needs critic, critic_opt and value_loss"):
        ppo_update(actor, None, opt, None, buf, PPOPolicyLoss(), None, UpdateConfig(), EXP)


def test_packed_service_matches_the_padded_one(models, rollouts):
    """``packed="on"`` (the CUDA default under ``"auto"``): the same values, scores and critic update as
    the padded passes, as the local run's ``--packed-passes`` gives."""
    _, _, critic, rm = models
    r = rollouts[0]
    p = r.sequences.shape[1] - r.response_mask.shape[1]
    services = [make_service(copy.deepcopy(critic), rm, packed=mode) for mode in ("off", "on")]
    seen = []
    services[1].critic.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    (v0, s0), (v1, s1) = (svc.infer(r.sequences, r.attention_mask, p, r.response_mask) for svc in services)
    assert seen == [1] * len(seen) and seen  # every critic pass of the packed service was one packed row
    torch.testing.assert_close(v1 * r.response_mask, v0 * r.response_mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    stats = [svc.train_rollout(r, UPD, seed=0) for svc in services]
    assert stats[1]["value/loss"] == pytest.approx(stats[0]["value/loss"], rel=1e-5)
    for a, b in zip(services[0].critic.parameters(), services[1].critic.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)  # fp32 rounding through Adam steps
