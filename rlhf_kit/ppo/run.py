"""Bookkeeping of a PPO run around its steps: optimizer state off the device during rollouts, one
step's metrics, validation rollouts, exact resume, checkpoints and the final HF directories.

With a critic server (a :class:`~rlhf_kit.ppo.remote.CriticTrainer` passed as ``remote``), its state is
saved before the actor's checkpoint (so ``latest`` never names a step the server lacks) and loaded with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from rlhf_kit.ppo.advantages import compute_advantages
from rlhf_kit.ppo.experience import ExperienceConfig
from rlhf_kit.ppo.remote import CriticTrainer
from rlhf_kit.ppo.scorers import decode_samples
from rlhf_kit.ppo.update import mean_over_ranks
from rlhf_kit.training.memory_budget import MemoryBudget

VALIDATION_KEYS = ("reward/score_mean", "reward/raw_score_mean", "kl/seq_mean", "response/length_mean")


@contextmanager
def optimizer_state_offloaded(
    optimizers: Iterable[torch.optim.Optimizer], device: torch.device | str, enabled: bool = True
) -> Iterator[None]:
    """Optimizer state on the CPU inside the block (generation and scoring), back on ``device`` after."""
    from rlhf_kit.training.offload import offload_optimizer_state, onload_optimizer_state

    optimizers = list(optimizers) if enabled else []
    for opt in optimizers:
        offload_optimizer_state(opt)
    yield
    for opt in optimizers:
        onload_optimizer_state(opt, device)


def step_metrics(
    exp_stats: dict,
    train_stats: dict,
    rollout_stats: dict,
    times: dict,
    schedulers: dict,
    device: torch.device | str,
) -> dict:
    """One PPO step's log row: experience and update statistics averaged over ranks, phase times,
    seconds since the process started (``time/since_launch``), rollout statistics, generated tokens per
    second (summed over ranks), learning rates (the critic's only when it trains here), peak GPU
    memory (none on CPU) and ``compile/`` counts (:func:`~rlhf_kit.training.metrics.compile_stats`)."""
    from rlhf_kit.training.dist import all_reduce_sum
    from rlhf_kit.training.metrics import compile_stats, device_memory_stats, seconds_since_launch

    rollout_stats = dict(rollout_stats)
    n_tokens = all_reduce_sum([rollout_stats.pop("rollout/generated_tokens")], device)[0]
    return {
        **mean_over_ranks({**exp_stats, **train_stats}, device),
        **times,
        "time/since_launch": seconds_since_launch(),
        **rollout_stats,
        "throughput/generated_tokens_per_s": n_tokens / max(times.get("time/generate", 0.0), 1e-9),
        **{f"lr/{name}": sched.get_last_lr()[0] for name, sched in schedulers.items()},
        **device_memory_stats(),
        **compile_stats(),
    }


def step_schedules(schedulers: dict, n: int, train_actor: bool = True) -> None:
    """``n`` steps of every learning-rate schedule (one per optimizer step of the update); the actor's
    (``"actor"``) waits while it does not train (critic warm-up)."""
    for _ in range(n):
        for name, scheduler in schedulers.items():
            if name != "actor" or train_actor:
                scheduler.step()


def validation_metrics(
    rollout: Callable[[Sequence[Sequence[int]]], tuple],
    prompts: Sequence[Sequence[int]],
    kl_coef: float,
    exp_cfg: ExperienceConfig,
    tokenizer,
    step: int,
    device: torch.device | str,
) -> tuple[dict, list[list]]:
    """Roll out ``prompts`` with ``rollout`` (e.g. a bound :func:`~rlhf_kit.ppo.collect_experience`; with
    ``exp_cfg.skip_old_logprobs`` or ``score_in_update`` it is called with ``cfg=`` a copy that scores with
    every model) and return the ``val/`` statistics averaged over ranks and ``[step, prompt, response,
    score]`` sample rows."""
    import dataclasses

    from rlhf_kit.estimators import needs_critic

    if exp_cfg.skip_old_logprobs or exp_cfg.score_in_update:  # validation scores with every model
        exp_cfg = dataclasses.replace(exp_cfg, skip_old_logprobs=False, score_in_update=False)
        data, _ = rollout(prompts, cfg=exp_cfg)
    else:
        data, _ = rollout(prompts)
    if not needs_critic(exp_cfg.advantage_estimator):  # one sample per prompt: no groups to baseline
        exp_cfg = dataclasses.replace(exp_cfg, advantage_estimator="reinforce_pp", group_size=1)
    data, stats = compute_advantages(data, kl_coef, exp_cfg)
    rows = [[step, *row] for row in decode_samples(tokenizer, data)]
    return mean_over_ranks({"val/" + k: stats[k] for k in VALIDATION_KEYS}, device), rows


def closing_metrics(step_stats: dict, val_stats: dict) -> dict:
    """What a PPO run's closing summary shows: the last step's mean score and KL, then the last
    validation's statistics (``val/...``, empty if none ran in this process)."""
    last = {k: step_stats[k] for k in ("reward/score_mean", "kl/seq_mean") if k in step_stats}
    return last | dict(val_stats)


def resume_ppo(
    ckpt_dir: str,
    ckpt: dict,
    *,
    kl_controller,
    prompt_stream,
    output_dir: str,
    remote: CriticTrainer | None = None,
    budget: MemoryBudget | None = None,
) -> int:
    """Restore the latest checkpoint of ``ckpt_dir`` into ``ckpt`` (models, optimizers, schedulers), the
    KL controller, the prompt stream's position, the micro-batch budget and the server's state; metrics
    rows logged after that step are dropped (they are logged again). Returns the step."""
    from rlhf_kit.training import dist as D
    from rlhf_kit.training.checkpoint import load_checkpoint
    from rlhf_kit.training.run import prepare_metrics_for_resume

    step, extra = load_checkpoint(ckpt_dir, **ckpt)
    if remote is not None and D.is_main_process():  # the server's state saved with this step
        remote.load(f"checkpoints/step_{step}")
    D.barrier()  # no rank asks the server for values before it has reloaded
    kl_controller.load_state_dict(extra["kl_controller"])
    prompt_stream.load_state_dict(extra["prompt_stream"])
    if budget is not None and "micro_batch_budget" in extra:  # cut as the uninterrupted run cuts
        budget.load_state_dict(extra["micro_batch_budget"])
    prepare_metrics_for_resume(output_dir, step)  # rows past the checkpoint are logged again
    return step


def save_ppo_checkpoint(
    ckpt_dir: str,
    step: int,
    ckpt: dict,
    *,
    kl_controller,
    prompt_stream,
    keep_last: int,
    remote: CriticTrainer | None = None,
    budget: MemoryBudget | None = None,
) -> dict[str, str]:
    """Everything an exact resume needs, atomically; the server's state first."""
    from rlhf_kit.training import dist as D
    from rlhf_kit.training.checkpoint import save_checkpoint

    if remote is not None and D.is_main_process():  # first, so `latest` never points at a step it lacks
        remote.save(f"checkpoints/step_{step}", keep_last=keep_last)
    extra = {"kl_controller": kl_controller.state_dict(), "prompt_stream": prompt_stream.state_dict()}
    if budget is not None:
        extra["micro_batch_budget"] = budget.state_dict()
    save_checkpoint(ckpt_dir, step, **ckpt, keep_last=keep_last, extra=extra)


def save_final_models(
    output_dir: str,
    actor,
    critic,
    tokenizer,
    accelerator,
    config: dict,
    remote: CriticTrainer | None = None,
) -> None:
    """``<output_dir>/final`` (the actor, FSDP2 shards gathered and LoRA merged, with ``ppo_config.json``)
    and ``<output_dir>/critic`` as standard HF directories; with ``remote`` the server writes the
    critic under its own output directory (``final/critic``); ``critic=None`` (a critic-free estimator)
    writes no critic. Returns the written model directories by name (``final model``, ``critic``)."""
    from rlhf_kit.training.hf import save_hf_model
    from rlhf_kit.training.run import write_json

    saved = {"final model": os.path.join(output_dir, "final")}
    save_hf_model(actor, saved["final model"], tokenizer)
    if remote is not None:
        if accelerator.is_main_process:
            remote.save("final")  # <server --output-dir>/final/critic
    elif critic is not None:
        saved["critic"] = os.path.join(output_dir, "critic")
        save_hf_model(accelerator.unwrap_model(critic).model, saved["critic"], tokenizer)
    if accelerator.is_main_process:
        write_json(os.path.join(output_dir, "final", "ppo_config.json"), config)
    return saved
