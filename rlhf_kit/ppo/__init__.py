"""One PPO step as plain functions: score experience, shape rewards and advantages, update.

A custom loop composes them (``recipes/ppo.py`` is one such loop)::

    gen = backend.generate(prompt_ids, prompt_mask, params)            # rlhf_kit.generation
    rollout = make_experience(gen, actor, ref, critic, scorer, cfg)     # logprobs, values, scores
    rollout = compute_advantages(rollout, kl_coef, cfg)                 # rewards, GAE, whitening
    stats = ppo_update(actor, critic, ..., RolloutBuffer with rollout)  # clipped losses, accumulation

The critic and reward model can also live in a separate job (``rlhf_kit.serving``): ``make_experience``
then takes values and scores from it, ``ppo_update`` runs actor-only (``UpdateConfig.train_critic=False``)
and the server trains the critic with the same ``ppo_update``, critic-only. This package never imports
``rlhf_kit.serving``: the caller builds the client and passes it in (``remote=``), typed by the
protocols of ``remote.py``.

One file per step: ``generate.py`` (prompts -> backend -> generations, dynamic dispatch),
``experience.py`` (generations -> four-model scores -> ``Rollout``), ``advantages.py`` (shaped
rewards, GAE), ``update.py`` (``ppo_update``), with ``scorers.py`` (reward model or function),
``prompts.py`` (``PromptStream``, ``repeat_prompts``), ``options.py`` (estimator flags), ``models.py`` (loading the four models), ``setup.py`` (scorer,
KL controller, placement, backend) and ``run.py`` (resume, checkpoints, metrics, final save).
Every public name is importable from ``rlhf_kit.ppo``.

Alignment: response position ``i`` holds the log-prob of response token ``i`` and the critic's value of
the state that generates it (hidden state one position earlier); ``response_mask`` includes EOS.
"""

from rlhf_kit.ppo.advantages import advantages_now_or_in_update, compute_advantages
from rlhf_kit.ppo.experience import (
    ExperienceConfig,
    collect_experience,
    make_experience,
    score_rollouts,
)
from rlhf_kit.ppo.generate import (
    GENERATION_CACHE,
    generate_rollouts,
    generate_rollouts_dynamic,
    keep_generation_cache,
    merge_generations,
    split_generation,
)
from rlhf_kit.ppo.models import PPOModels, load_critic_and_reward_model, load_ppo_models
from rlhf_kit.ppo.options import EstimatorOptions, check_estimator_options
from rlhf_kit.ppo.prompts import PromptStream, repeat_prompts
from rlhf_kit.ppo.remote import CriticInference, CriticTrainer
from rlhf_kit.ppo.run import (
    closing_metrics,
    optimizer_state_offloaded,
    resume_ppo,
    save_final_models,
    save_ppo_checkpoint,
    step_metrics,
    step_schedules,
    validation_metrics,
)
from rlhf_kit.ppo.scorers import (
    FunctionScorer,
    RewardModelScorer,
    decode_prompts_and_responses,
    decode_samples,
)
from rlhf_kit.ppo.setup import (
    load_reward_fn,
    make_backend,
    make_kl_controller,
    make_scorer,
    place_ppo_models,
)
from rlhf_kit.ppo.update import UpdateConfig, mean_over_ranks, ppo_update
from rlhf_kit.ppo.wiring import (
    check_run_settings,
    experience_config,
    generation_batch_size,
    generation_cache_mode,
    held_out_size,
    load_prompt_sets,
    make_losses,
    memory_budget,
    sampling_params,
    split_prompts,
    update_config,
    updates_per_step,
)

__all__ = [
    "GENERATION_CACHE",
    "CriticInference",
    "CriticTrainer",
    "EstimatorOptions",
    "ExperienceConfig",
    "FunctionScorer",
    "PPOModels",
    "PromptStream",
    "RewardModelScorer",
    "UpdateConfig",
    "check_estimator_options",
    "check_run_settings",
    "closing_metrics",
    "collect_experience",
    "advantages_now_or_in_update",
    "compute_advantages",
    "decode_prompts_and_responses",
    "decode_samples",
    "experience_config",
    "generate_rollouts",
    "generate_rollouts_dynamic",
    "generation_batch_size",
    "generation_cache_mode",
    "held_out_size",
    "keep_generation_cache",
    "load_critic_and_reward_model",
    "load_ppo_models",
    "load_prompt_sets",
    "load_reward_fn",
    "make_backend",
    "make_experience",
    "make_kl_controller",
    "make_losses",
    "make_scorer",
    "mean_over_ranks",
    "memory_budget",
    "merge_generations",
    "optimizer_state_offloaded",
    "place_ppo_models",
    "ppo_update",
    "repeat_prompts",
    "resume_ppo",
    "sampling_params",
    "split_prompts",
    "save_final_models",
    "save_ppo_checkpoint",
    "score_rollouts",
    "split_generation",
    "step_metrics",
    "step_schedules",
    "update_config",
    "updates_per_step",
    "validation_metrics",
]
