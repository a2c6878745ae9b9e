"""The set-up and run helpers of rlhf_kit.ppo that recipes/ppo.py calls around its steps."""

import json

import pytest
import torch

from rlhf_kit.ppo import (
    CriticInference,
    CriticTrainer,
    FunctionScorer,
    RewardModelScorer,
    make_backend,
    make_kl_controller,
    make_scorer,
    step_metrics,
    step_schedules,
)
from rlhf_kit.serving import CriticRewardService, RemoteCritic
from tests.conftest import make_reward_model


def test_serving_classes_satisfy_the_protocols_ppo_defines():
    for cls in (RemoteCritic, CriticRewardService):
        assert issubclass(cls, CriticInference) and issubclass(cls, CriticTrainer)

    class OnlyInfer:
        def infer(self, sequences, attention_mask, prompt_length, response_mask, *, with_scores=True):
            return torch.zeros(1, 1), None

    assert isinstance(OnlyInfer(), CriticInference) and not isinstance(OnlyInfer(), CriticTrainer)


def test_make_scorer_picks_scorer_and_statistics(tokenizer, tmp_path):
    rm = make_reward_model(tokenizer, seed=0)
    (tmp_path / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    kw = dict(reward_model=rm, reward_model_path=str(tmp_path))
    scorer, stats = make_scorer(tokenizer, reward_fn=None, **kw)
    assert isinstance(scorer, RewardModelScorer) and stats == {"mean": 0.5, "std": 2.0}
    assert make_scorer(tokenizer, reward_fn=None, standardize=False, **kw)[1] is None
    scorer, stats = make_scorer(tokenizer, reward_fn="tests.recipes.reward_fns:space_fraction", **kw)
    assert isinstance(scorer, FunctionScorer) and stats is None  # text rewards are not standardised
    server = {"mean": 1.0, "std": 3.0}
    assert make_scorer(tokenizer, reward_fn=None, remote=True, server_stats=server, **kw) == (None, server)


def test_step_schedules_hold_the_actor_during_critic_warmup():
    def sched():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        opt.step()  # (no gradients: a no-op) the order torch expects before the schedule steps
        return s

    scheds = {"actor": sched(), "critic": sched()}
    step_schedules(scheds, 3, train_actor=False)
    assert scheds["actor"].last_epoch == 0 and scheds["critic"].last_epoch == 3
    step_schedules(scheds, 2)
    assert scheds["actor"].last_epoch == 2 and scheds["critic"].last_epoch == 5
    row = step_metrics(
        {"kl/seq_mean": 0.1}, {"policy/loss": 2.0}, {"rollout/generated_tokens": 30, "dispatch/moved": 1},
        {"time/generate": 2.0}, scheds, "cpu",
    )  # fmt: skip
    assert row["throughput/generated_tokens_per_s"] == 15.0 and row["dispatch/moved"] == 1
    assert row["lr/critic"] == pytest.approx(1 / 6) and row["lr/actor"] == pytest.approx(1 / 3)
    assert "rollout/generated_tokens" not in row and row["policy/loss"] == 2.0


def test_make_backend_refuses_dynamic_dispatch_through_sharded_hf_generate():
    with pytest.raises(ValueError, match="--dynamic-dispatch with FSDP needs --backend compiled"):
        make_backend("hf", None, None, actor_path="x", accelerator=None, max_batch_size=1, max_seq_len=8,
                     dynamic=True, sharded=True)  # fmt: skip


def test_auto_backend_is_compiled_on_cuda_only():
    from rlhf_kit.ppo.setup import resolve_backend

    assert resolve_backend("auto", "cuda:0") == "compiled"
    assert resolve_backend("auto", torch.device("cpu")) == "hf"
    assert resolve_backend("hf", "cuda") == "hf" and resolve_backend("compiled", "cpu") == "compiled"


def test_make_kl_controller():
    fixed, adaptive = make_kl_controller(0.1), make_kl_controller(0.1, adaptive=True, target=1.0, horizon=10)
    fixed.update(50.0, 10)
    adaptive.update(50.0, 10)  # KL far above target: the coefficient grows
    assert fixed.value == 0.1 and adaptive.value > 0.1


def test_compiled_backend_has_one_bucket_so_validation_reuses_the_rollout_graph(tokenizer, tmp_path):
    """A validation batch smaller than the rollout micro-batch pads up to it instead of compiling and
    capturing another bucket."""
    from types import SimpleNamespace

    from tests.conftest import make_causal_lm

    make_causal_lm(tokenizer).save_pretrained(tmp_path / "actor")
    acc = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    backend, _ = make_backend("compiled", None, tokenizer, actor_path=str(tmp_path / "actor"), accelerator=acc,
                              max_batch_size=16, max_seq_len=64)  # fmt: skip
    assert backend.buckets == (16,)
    assert backend._bucket(3) == 16


class _Backend:
    """Stands in for a backend that reports its KV cache size."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def kv_cache_bytes(self) -> int:
        return self.nbytes


def test_generation_cache_is_kept_when_small_on_cuda_and_released_otherwise(monkeypatch):
    from types import SimpleNamespace

    from rlhf_kit.ppo import generation_cache_mode, keep_generation_cache

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * gib))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert keep_generation_cache(_Backend(gib), "auto", cuda)  # 1.25% of the card
    assert not keep_generation_cache(_Backend(5 * gib), "auto", cuda)  # 6.25%: training may need it
    assert not keep_generation_cache(_Backend(0), "auto", cuda)  # asleep, or nothing to keep
    assert not keep_generation_cache(object(), "auto", cuda)  # a backend without a cache (HF)
    assert not keep_generation_cache(_Backend(gib), "auto", cpu)  # no graphs to keep on CPU
    assert keep_generation_cache(_Backend(5 * gib), "keep", cuda) and keep_generation_cache(
        object(), "keep", cpu
    )
    assert not keep_generation_cache(_Backend(gib), "release", cuda)
    with pytest.raises(ValueError, match="choose one of auto, keep, release"):
        keep_generation_cache(_Backend(gib), "always", cuda)
    run = SimpleNamespace(generation_cache="auto", offload_idle_models=False, offload_optimizer=False)
    assert generation_cache_mode(run) == "auto"
    assert generation_cache_mode(SimpleNamespace(**{**vars(run), "offload_optimizer": True})) == "release"
    kept = SimpleNamespace(**{**vars(run), "generation_cache": "keep", "offload_idle_models": True})
    assert generation_cache_mode(kept) == "keep"


def test_a_kept_generation_cache_gives_the_rollouts_a_released_one_gives(tokenizer):
    """Two consecutive rollouts through one CompiledBackend: with the cache kept the second reuses the
    first's KV buffers and state, and must sample exactly what a backend that released them samples."""
    from rlhf_kit.data import PromptCollator
    from rlhf_kit.generation import CompiledBackend, SamplingParams
    from rlhf_kit.models import TokenValueModel
    from rlhf_kit.ppo import ExperienceConfig, FunctionScorer, PPOModels, collect_experience
    from tests.conftest import make_causal_lm

    actor = make_causal_lm(tokenizer, seed=1)
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4))
    models = PPOModels(actor=actor, critic=critic, reference=make_causal_lm(tokenizer, seed=2))
    prompts = [tokenizer(t)["input_ids"] for t in ("Human: hi", "Human: how are you today", "Human: ok")]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, pad_token_id=tokenizer.pad_token_id)
    scorer = FunctionScorer(lambda prompts, responses: [1.0] * len(responses), tokenizer)
    runs = {}
    for mode in ("keep", "release"):
        backend = CompiledBackend(make_causal_lm(tokenizer, seed=1), max_batch_size=4, max_seq_len=32)
        torch.manual_seed(0)
        rollouts, held = [], []
        for _ in range(2):
            rollout, _ = collect_experience(
                backend, prompts, PromptCollator(tokenizer.pad_token_id), params,
                models, scorer, ExperienceConfig(), generation_batch_size=4, device="cpu",
                pad_token_id=tokenizer.pad_token_id, generation_cache=mode,
            )  # fmt: skip
            rollouts.append(rollout)
            held.append(backend.kv_cache_bytes())
        runs[mode] = rollouts
        assert (held[-1] > 0) == (mode == "keep"), held
    for kept, released in zip(runs["keep"], runs["release"]):
        assert torch.equal(kept.sequences, released.sequences)
        assert torch.equal(kept.logprobs, released.logprobs)


def test_update_token_budget_defaults_to_the_full_length_fixed_micro_batch():
    from types import SimpleNamespace

    from rlhf_kit.ppo.wiring import micro_batch_tokens

    cfg = SimpleNamespace(
        micro_batch_size=4, max_prompt_length=128, max_new_tokens=24, micro_batch_tokens=None
    )
    assert micro_batch_tokens(cfg) == 4 * 152
    cfg.micro_batch_tokens = 0  # fixed micro-batches of --micro-batch-size
    assert micro_batch_tokens(cfg) == 0
    cfg.micro_batch_tokens = 4096
    assert micro_batch_tokens(cfg) == 4096


def test_memory_budget_measures_on_cuda_only_and_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rlhf_kit.ppo import PromptStream, memory_budget, resume_ppo, save_ppo_checkpoint
    from rlhf_kit.ppo.wiring import check_run_settings

    cfg = SimpleNamespace(
        micro_batch_size=4, max_prompt_length=100, max_new_tokens=28, micro_batch_tokens=None,
        micro_batch_memory=0.8, global_batch_size=64,
    )  # fmt: skip
    cpu = memory_budget(cfg, world_size=2, device=torch.device("cpu"))
    assert cpu.tokens == 4 * 128 and cpu.max_tokens == 32 * 128 and cpu.probe is None  # grows on CUDA only
    assert memory_budget(cfg, 1, torch.device("cuda", 0)).probe is not None  # built, nothing touched yet
    assert memory_budget(cfg, 1, "cuda:0").probe is not None  # a device named by a string too
    # scoring in the update holds actor and critic activations of a whole mini-batch at once: twice the cap
    assert memory_budget(SimpleNamespace(**vars(cfg), score_in_update="on"), 2, "cpu").max_tokens == 64 * 128
    one_step = dict(score_in_update="auto", ppo_epochs=1, num_rollout_samples=64, samples_per_prompt=1,
                    advantage_estimator="gae", critic_server=None, critic_warmup_steps=0, old_logprobs="recompute")  # fmt: skip
    auto = SimpleNamespace(**vars(cfg), **one_step)
    assert memory_budget(auto, 2, "cpu").max_tokens == 32 * 128  # auto: on CUDA only
    assert memory_budget(auto, 2, "cuda:0").max_tokens == 64 * 128
    auto.ppo_epochs = 2  # two optimizer steps per rollout: not possible, so auto is off
    assert memory_budget(auto, 2, "cuda:0").max_tokens == 32 * 128
    cfg.micro_batch_memory = 0.0
    assert memory_budget(cfg, 1, torch.device("cuda", 0)).probe is None
    cfg.micro_batch_tokens = 0  # fixed micro-batches: no budget at all
    assert memory_budget(cfg, 1, torch.device("cpu")) is None
    cfg.micro_batch_memory = 1.0
    with pytest.raises(ValueError, match="--micro-batch-memory must be in"):
        check_run_settings(cfg, 1)

    # the grown budget is part of the checkpoint: a resumed run cuts as the uninterrupted one
    cpu.tokens, cpu.measured, cpu.updates = 2048, True, 2
    model = torch.nn.Linear(2, 2)
    ckpt = {"models": {"m": model}, "optimizers": {}, "schedulers": {}}
    state = {"kl_controller": make_kl_controller(0.1, False, 6.0, 100), "prompt_stream": PromptStream([[1], [2]])}
    save_ppo_checkpoint(str(tmp_path / "ckpt"), 2, ckpt, keep_last=1, budget=cpu, **state)
    fresh = memory_budget(SimpleNamespace(**{**vars(cfg), "micro_batch_tokens": None, "micro_batch_memory": 0.8}),
                          2, torch.device("cpu"))  # fmt: skip
    step = resume_ppo(str(tmp_path / "ckpt"), ckpt, output_dir=str(tmp_path), budget=fresh, **state)
    assert step == 2 and fresh.state_dict() == cpu.state_dict()


def test_generation_batch_is_never_larger_than_what_a_rank_generates_at_once():
    from types import SimpleNamespace

    from rlhf_kit.ppo import generation_batch_size

    cfg = SimpleNamespace(rollout_micro_batch_size=64, num_rollout_samples=16, samples_per_prompt=1, num_val_samples=8)
    assert generation_batch_size(cfg, 1) == 16  # the KV cache is sized for 16 rows, not 64
    assert generation_batch_size(cfg, 2) == 8  # each rank generates half
    cfg.samples_per_prompt = 4  # each prompt repeated: 64 samples per rank
    assert generation_batch_size(cfg, 1) == 64 and generation_batch_size(cfg, 2) == 32
    cfg.samples_per_prompt, cfg.num_val_samples = 1, 40  # validation is the largest call
    assert generation_batch_size(cfg, 1) == 40 and generation_batch_size(cfg, 4) == 10
    assert generation_batch_size(cfg, 4, dynamic=True) == 40  # dynamic dispatch: every rank sees all
    cfg.rollout_micro_batch_size = 8  # the setting caps it
    assert generation_batch_size(cfg, 1) == 8
