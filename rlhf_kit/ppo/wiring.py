"""From a PPO run's flat settings to the step's configuration objects.

``recipes/ppo.py`` keeps one flat config (every flag documented in ``--help``); the library's pieces
take small typed configs. These functions do the translation once, so a loop of one's own that keeps
the same field names (``cfg`` is any object with the recipe's ``PPOConfig`` attributes) gets the same
experience, sampling, update and loss settings as the recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf_kit.data import hold_out, load_prompts, tokenize_prompts
from rlhf_kit.data.tokenizer import stop_token_ids
from rlhf_kit.generation.base import SamplingParams
from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
from rlhf_kit.ppo.experience import ExperienceConfig
from rlhf_kit.ppo.prompts import PromptStream
from rlhf_kit.ppo.update import UpdateConfig
from rlhf_kit.training.memory_budget import MemoryBudget, cuda_probe


def experience_config(cfg: Any, stats: dict | None, device: Any = "cpu") -> ExperienceConfig:
    """Scoring and advantage settings; ``stats`` (``{"mean", "std"}``) standardise the scores; ``device``
    resolves ``--score-in-update auto``. Scoring in the update covers skipping the old log-probs, so the
    two are never both on."""
    in_update = scores_in_update(cfg, device)
    return ExperienceConfig(
        temperature=cfg.temperature, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
        normalize_advantages=cfg.normalize_advantages, missing_eos_penalty=cfg.missing_eos_penalty,
        score_mean=stats["mean"] if stats else 0.0, score_std=stats["std"] if stats else 1.0,
        micro_batch_size=cfg.rollout_micro_batch_size, advantage_estimator=cfg.advantage_estimator,
        group_size=cfg.samples_per_prompt, kl_in_loss=cfg.kl_in_loss, score_in_update=in_update,
        skip_old_logprobs=one_step_on_policy(cfg) and not in_update,
        old_logprobs=getattr(cfg, "old_logprobs", "recompute"), packed=getattr(cfg, "packed_passes", "auto"),
    )  # fmt: skip


def one_step_on_policy(cfg: Any) -> bool:
    """True when one rollout makes exactly one optimizer step and its reward carries no KL, so scoring can
    skip the actor's forward pass (``ExperienceConfig.skip_old_logprobs``): the update's forward, taken
    before the step, is the old policy. GRPO's usual setting (``--ppo-epochs 1``, the rollout one global
    batch, ``--kl-in-loss``)."""
    no_kl_reward = cfg.kl_in_loss or (cfg.kl_coef == 0 and not cfg.adaptive_kl)
    return one_step_per_rollout(cfg) and no_kl_reward


def one_step_per_rollout(cfg: Any) -> bool:
    """One optimizer step per rollout that trains the actor: one epoch over one global batch, no critic
    warm-up; the update's forward pass then runs with the old policy's weights."""
    return cfg.ppo_epochs == 1 and updates_per_step(cfg) == 1 and cfg.critic_warmup_steps == 0


def score_in_update_possible(cfg: Any) -> bool:
    """Whether the update can score the rollout itself (``--score-in-update``): GAE with the local critic,
    one optimizer step per rollout, the old log-probs recomputed."""
    from rlhf_kit.estimators import needs_critic

    local = cfg.critic_server is None and cfg.old_logprobs == "recompute"
    return needs_critic(cfg.advantage_estimator) and one_step_per_rollout(cfg) and local


def scores_in_update(cfg: Any, device: Any) -> bool:
    """``--score-in-update`` resolved: ``auto`` is on where possible on a CUDA device (where the saved
    forward passes were measured faster, docs/benchmarks.md); ``on`` and ``off`` as given."""
    choice = getattr(cfg, "score_in_update", "off")
    if choice == "auto":
        return torch.device(device).type == "cuda" and score_in_update_possible(cfg)
    return choice == "on"


def generation_batch_size(cfg: Any, world_size: int, dynamic: bool = False) -> int:
    """Prompts per generation call on a rank, and the compiled backend's largest batch (its KV cache's
    rows): ``--rollout-micro-batch-size``, but no more than the rank ever generates at once, its share of
    a rollout or of the validation prompts (all of them with dynamic dispatch), so a small rollout does
    not size the cache for 64."""
    share = 1 if dynamic else world_size
    most = max(cfg.num_rollout_samples * cfg.samples_per_prompt // share, -(-cfg.num_val_samples // share))
    return max(1, min(cfg.rollout_micro_batch_size, most))


def generation_cache_mode(cfg: Any) -> str:
    """``cfg.generation_cache``, except that ``"auto"`` releases the generation cache when the run offloads
    models or optimizer state: those runs asked for memory first."""
    if cfg.generation_cache == "auto" and (cfg.offload_idle_models or cfg.offload_optimizer):
        return "release"
    return cfg.generation_cache


def sampling_params(cfg: Any, tokenizer) -> SamplingParams:
    """Generation settings of the rollouts (and of validation); stops at EOS and the end of turn."""
    return SamplingParams(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, stop_strings=cfg.stop_strings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer),  # the chat template's end of turn, and EOS
    )  # fmt: skip


def update_config(cfg: Any, world_size: int, train_critic: bool) -> UpdateConfig:
    """Update settings; the critic trains here unless a critic server holds it (or there is none)."""
    return UpdateConfig(
        mini_batch_size=cfg.global_batch_size // world_size, micro_batch_size=cfg.micro_batch_size,
        ppo_epochs=cfg.ppo_epochs, max_grad_norm=cfg.max_grad_norm, train_critic=train_critic,
        group_size=cfg.samples_per_prompt, micro_batch_tokens=micro_batch_tokens(cfg),
        packed=getattr(cfg, "packed_passes", "auto"),
    )  # fmt: skip


def micro_batch_tokens(cfg: Any) -> int:
    """The update's token budget: ``--micro-batch-tokens``, or when unset the fixed micro-batch at full
    length (``--micro-batch-size x (--max-prompt-length + --max-new-tokens)``), so no micro-batch is
    larger than that and shorter samples go more at a time; 0 keeps fixed micro-batches."""
    tokens = getattr(cfg, "micro_batch_tokens", 0)
    if tokens is None:
        tokens = cfg.micro_batch_size * (cfg.max_prompt_length + cfg.max_new_tokens)
    return tokens


def memory_budget(cfg: Any, world_size: int, device: Any) -> MemoryBudget | None:
    """The update's micro-batch budget, grown on a CUDA device to ``--micro-batch-memory`` of its memory
    (:class:`~rlhf_kit.training.memory_budget.MemoryBudget`); None with fixed micro-batches
    (``--micro-batch-tokens 0``). Elsewhere (CPU) it stays at :func:`micro_batch_tokens`."""
    tokens = micro_batch_tokens(cfg)
    if tokens <= 0:
        return None
    fraction = getattr(cfg, "micro_batch_memory", 0.0)
    probe = cuda_probe(device) if fraction > 0 and torch.device(device).type == "cuda" else None
    whole = cfg.global_batch_size // world_size * (cfg.max_prompt_length + cfg.max_new_tokens)
    if scores_in_update(cfg, device):  # twice: one micro-batch holds actor and critic activations
        whole *= 2
    return MemoryBudget(tokens, fraction, max_tokens=whole, probe=probe)


def updates_per_step(cfg: Any) -> int:
    """Optimizer steps per PPO step: epochs x (rollout samples x samples per prompt) / global batch."""
    return cfg.ppo_epochs * cfg.num_rollout_samples * cfg.samples_per_prompt // cfg.global_batch_size


def make_losses(cfg: Any, use_critic: bool) -> tuple[PPOPolicyLoss, ValueLoss | None]:
    """The clipped policy loss (KL as a k3 loss term with ``kl_in_loss``) and, with a critic, the value loss."""
    policy_loss = PPOPolicyLoss(
        cfg.ratio_eps, cfg.entropy_coef, cfg.loss_aggregation, kl_coef=cfg.kl_coef if cfg.kl_in_loss else 0.0,
        norm_constant=cfg.loss_norm_constant or cfg.max_new_tokens,
    )  # fmt: skip
    return policy_loss, ValueLoss(cfg.value_clip) if use_critic else None


def held_out_size(cfg: Any) -> int:
    """Prompts held out of ``--train-prompts`` when no ``--val-prompts`` is given: ``--val-size``, or
    ``--num-val-samples`` when it is unset."""
    return cfg.num_val_samples if getattr(cfg, "val_size", None) is None else cfg.val_size


def split_prompts(prompts: Sequence, val_size: int, seed: int, source: str = "prompts") -> tuple[list, list]:
    """``(train, val)``: ``val_size`` prompts picked by a permutation seeded with ``seed`` go to
    validation, the rest to training; both keep the file order. The same prompts and seed give the
    same split on every rank and every resume. ``source`` names the file in the error."""
    if not 0 < val_size < len(prompts):
        raise ValueError(
            f"{source}: --val-size {val_size} must be >= 1 and leave training prompts ({len(prompts)} in "
            f"the file); hold out fewer or give --val-prompts"
        )
    return hold_out(prompts, val_size, seed)


def load_prompt_sets(
    cfg: Any, tokenizer, log: Callable[[str], Any] | None = None
) -> tuple[PromptStream, list[list[int]]]:
    """Training prompts as a seeded :class:`PromptStream`, and the first ``num_val_samples`` validation
    prompts, both tokenised and left-truncated to ``max_prompt_length``.

    Without ``cfg.val_prompts``, :func:`held_out_size` prompts of ``cfg.train_prompts`` are held out
    (:func:`split_prompts` with ``cfg.seed``) and never trained on; ``log`` gets one line saying so."""
    train = load_prompts(cfg.train_prompts)
    if cfg.val_prompts is None:
        size, total = held_out_size(cfg), len(train)
        train, val = split_prompts(train, size, cfg.seed, str(cfg.train_prompts))
        if log is not None:
            log(
                f"no --val-prompts: held out {size} of the {total} prompts of {cfg.train_prompts} for "
                f"validation (seed {cfg.seed}); {len(train)} left for training"
            )
    else:
        val = load_prompts(cfg.val_prompts)
    train_ids, _ = tokenize_prompts(train, tokenizer, cfg.max_prompt_length)
    val_ids, _ = tokenize_prompts(val[: cfg.num_val_samples], tokenizer, cfg.max_prompt_length)
    return PromptStream(train_ids, seed=cfg.seed), val_ids


def check_run_settings(cfg: Any, world_size: int) -> None:
    """The run's checks that need no model, past the single-field ones: the micro-batch memory share,
    sampling temperature and lengths, batch arithmetic over ranks, model paths, prompt files parsed (a
    bad line is one error now, not a traceback after the models), ``--val-size`` leaving training
    prompts, the reward function's form. One-line ``ValueError`` each."""
    from rlhf_kit.estimators import needs_critic
    from rlhf_kit.training.validate import check_model_path, check_path_exists

    if not 0 <= getattr(cfg, "micro_batch_memory", 0.0) < 1:
        raise ValueError(f"--micro-batch-memory must be in [0, 1), got {cfg.micro_batch_memory}")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.max_new_tokens < cfg.min_new_tokens:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} < --min-new-tokens {cfg.min_new_tokens}")
    if cfg.num_rollout_samples * cfg.samples_per_prompt % cfg.global_batch_size:
        raise ValueError(
            f"--num-rollout-samples {cfg.num_rollout_samples} x --samples-per-prompt {cfg.samples_per_prompt} "
            f"must be a multiple of --global-batch-size {cfg.global_batch_size} (a mini-batch is one step)"
        )
    if cfg.num_rollout_samples % world_size:
        raise ValueError(
            f"--num-rollout-samples {cfg.num_rollout_samples} does not split over {world_size} ranks"
        )
    for name in ("actor", "reward_model", "critic"):
        if getattr(cfg, name) is not None:
            check_model_path(getattr(cfg, name))
    for name in ("train_prompts", "val_prompts"):
        if getattr(cfg, name) is not None:
            check_path_exists(getattr(cfg, name), f"--{name.replace('_', '-')}")
            load_prompts(getattr(cfg, name))  # a bad line: one line now, not a traceback after the models
    if cfg.train_prompts is not None and cfg.val_prompts is None:  # --val-size must leave training prompts
        split_prompts(load_prompts(cfg.train_prompts), held_out_size(cfg), cfg.seed, cfg.train_prompts)
    if cfg.reward_fn is not None and ":" not in cfg.reward_fn:
        raise ValueError(f"--reward-fn must look like 'module:function', got {cfg.reward_fn!r}")
    if (
        cfg.reward_fn is not None
        and cfg.critic is None
        and cfg.reward_model is None
        and cfg.actor is not None
        and cfg.critic_server is None
        and needs_critic(cfg.advantage_estimator)
    ):
        raise ValueError("--reward-fn needs --critic (or --reward-model) to initialise the critic")
