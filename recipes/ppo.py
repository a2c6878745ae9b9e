"""PPO with four models: actor, critic, frozen reference and reward model (or a reward function).

    python recipes/ppo.py                                  # embedded default: tiny models, shipped HH
    accelerate launch recipes/ppo.py --actor sft/final --reward-model rm/final \
        --train-prompts data/hh/train_prompts.jsonl --val-prompts data/hh/test_prompts.jsonl

Each step: take --num-rollout-samples prompts, generate in micro-batches, score with the four
models, shape rewards (per-token KL + score on the last token), GAE, then --ppo-epochs passes of
clipped policy and value updates in mini-batches of --global-batch-size. Defaults follow
NeMo-Aligner where they fit a CPU demo; see docs/ppo.md for the full-scale values.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro


@dataclass
class PPOConfig:
    """PPO training. Every field is a command-line flag (``--field-name``)."""

    # --- models and data ----------------------------------------------------------------------
    actor: str | None = None
    """SFT checkpoint (HF causal-LM dir or hub name) that starts the actor and the reference.
    None: a tiny random model is made on the fly (embedded default)."""
    reward_model: str | None = None
    """Reward model dir (output of recipes/reward_model.py). None with no --reward-fn: a tiny one."""
    critic: str | None = None
    """Critic initialisation (a sequence-classification checkpoint). None: the reward model."""
    reward_fn: str | None = None
    """'module:function' scoring decoded text, fn(prompts, responses) -> list[float]; replaces the RM."""
    critic_server: str | None = None
    """URL of a critic server (recipes/critic_server.py): critic and RM live in that separate job, which
    also owns the critic's optimisation settings (--critic, --critic-lr, ... do not apply here)."""
    train_prompts: str | None = None
    """Prompt file ({"text"} / {"prompt"} / chat messages per line). None: the shipped HH sample."""
    val_prompts: str | None = None
    """Held-out prompts for validation. None: the test split of the shipped HH sample."""
    output_dir: str = "outputs/ppo"
    """Where checkpoints, metrics.jsonl and the final models go."""

    # --- rollout -------------------------------------------------------------------------------
    max_steps: int = 4
    """PPO steps (one rollout + its updates each)."""
    num_rollout_samples: int = 16
    """Prompts per step across all ranks (NeMo-Aligner: 512)."""
    rollout_micro_batch_size: int = 8
    """Prompts per generation call on each rank."""
    max_prompt_length: int = 128
    """Prompts are left-truncated to this many tokens (the end of the dialogue is kept)."""
    max_new_tokens: int = 24
    min_new_tokens: int = 1
    temperature: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    """Generation also ends at any of these strings (besides EOS)."""
    backend: Literal["hf", "compiled"] = "hf"
    """Generation backend: HF generate, or the static-cache compiled decoder."""
    dynamic_dispatch: bool = False
    """With several ranks, hand out rollout micro-batches first come first served and rebalance the
    samples before scoring (needs local generation: --backend compiled, or no FSDP)."""

    # --- rewards and advantages ----------------------------------------------------------------
    kl_coef: float = 0.02
    """Initial KL coefficient (NeMo-Aligner 0.01-0.02, TRL 0.05)."""
    kl_estimator: Literal["k1", "abs", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    """Ziegler et al. adaptive controller instead of a fixed coefficient."""
    kl_target: float = 6.0
    kl_horizon: int = 10000
    standardize_scores: bool = True
    """Use the RM's saved reward_stats.json (mean, std) to standardise scores."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that never emitted EOS."""
    gamma: float = 1.0
    lam: float = 0.95
    normalize_advantages: bool = True

    # --- optimisation --------------------------------------------------------------------------
    global_batch_size: int = 8
    """Samples per optimizer step across all ranks (NeMo-Aligner: 64)."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank."""
    ppo_epochs: int = 1
    ratio_eps: float = 0.2
    value_clip: float = 0.2
    """Critic loss clip (0: plain squared error)."""
    entropy_coef: float = 0.0
    critic_warmup_steps: int = 0
    """Steps that train only the critic."""
    actor_lr: float = 1e-5
    actor_min_lr: float = 1e-6
    critic_lr: float = 1e-5
    critic_min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    lora_r: int = 0
    """>0 trains LoRA adapters on the actor; the reference is then the actor with adapters disabled."""
    lora_alpha: int = 16
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto: bf16 when the accelerator supports it."""
    fsdp: bool = False
    """Shard the four models with FSDP2 when several processes run (implied by accelerate/fsdp.yaml)."""
    offload_idle_models: bool = False
    """Keep reference and reward model on CPU (pinned) except while scoring."""
    offload_optimizer: bool = False
    """Move optimizer state to CPU during generation and scoring."""
    compile_blocks: bool = False
    """torch.compile each transformer block of the four models (GPU: fewer, fused kernels per layer)."""
    master_weights: bool = False
    """bf16 actor/critic weights with fp32 master weights in AdamW (one process; faster than autocast)."""

    # --- bookkeeping ---------------------------------------------------------------------------
    val_check_interval: int = 2
    num_val_samples: int = 8
    save_interval: int = 2
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    overwrite: bool = False
    """Start again in an output directory used by an earlier run (its checkpoints and metrics go)."""
    extend_max_steps: bool = False
    """With --resume: accept a larger --max-steps than the stored run. The schedule is rebuilt for the
    new length from the resumed step on, so the result differs from a run started with it."""
    max_bad_steps: int = 10
    """Steps with non-finite rewards, losses or gradient norms (skipped, never applied) tolerated."""
    keep_last: int = 2
    report_to: tuple[Literal["jsonl", "wandb", "tensorboard"], ...] = ("jsonl",)
    run_name: str | None = None
    seed: int = 0


#: Fields checked > 0 / >= 0 before anything is loaded (every float field is also checked finite).
POSITIVE = ("max_steps", "num_rollout_samples", "rollout_micro_batch_size", "max_prompt_length",
            "max_new_tokens", "actor_lr", "critic_lr", "ppo_epochs", "val_check_interval", "save_interval")  # fmt: skip
NON_NEGATIVE = ("actor_min_lr", "critic_min_lr", "kl_coef", "entropy_coef", "ratio_eps", "value_clip",
                "weight_decay", "max_grad_norm", "warmup_steps", "critic_warmup_steps", "max_bad_steps")  # fmt: skip
#: Settings that may change on --resume besides output and reporting ones (they change no weights).
MAY_CHANGE = ("offload_idle_models", "offload_optimizer")


def validate(cfg: PPOConfig, world_size: int) -> int:
    """Check the configuration before loading anything; returns gradient-accumulation steps."""
    from rlhf_kit.data import load_prompts
    from rlhf_kit.training.batching import resolve_batch_sizes
    from rlhf_kit.training.run import check_numbers
    from rlhf_kit.training.validate import check_model_path, check_path_exists

    check_numbers(cfg, positive=POSITIVE, non_negative=NON_NEGATIVE, unit_interval=("gamma", "lam"))
    accum = resolve_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, world_size)
    if cfg.num_rollout_samples % cfg.global_batch_size:
        raise ValueError(
            f"--num-rollout-samples {cfg.num_rollout_samples} must be a multiple of "
            f"--global-batch-size {cfg.global_batch_size} (each mini-batch is one optimizer step)"
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
    if cfg.reward_fn is not None and ":" not in cfg.reward_fn:
        raise ValueError(f"--reward-fn must look like 'module:function', got {cfg.reward_fn!r}")
    if cfg.critic_server is not None and world_size > 1:
        raise ValueError(f"--critic-server takes a single actor process, got WORLD_SIZE={world_size}")
    if (
        cfg.reward_fn is not None
        and cfg.critic is None
        and cfg.reward_model is None
        and cfg.actor is not None
        and cfg.critic_server is None
    ):
        raise ValueError("--reward-fn needs --critic (or --reward-model) to initialise the critic")
    if cfg.master_weights and (world_size > 1 or cfg.fsdp):
        raise ValueError("--master-weights is for one process; with several, FSDP2 keeps the fp32 masters")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.max_new_tokens < cfg.min_new_tokens:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} < --min-new-tokens {cfg.min_new_tokens}")
    return accum


def load_reward_fn(spec: str):
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def main(cfg: PPOConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_kit.data import PromptCollator, load_prompts, tokenize_prompts
    from rlhf_kit.generation.base import SamplingParams
    from rlhf_kit.generation.hf import HFBackend
    from rlhf_kit.generation.resharding import iter_full_params
    from rlhf_kit.kl import AdaptiveKLController, FixedKLController
    from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
    from rlhf_kit.models import load_reward_stats
    from rlhf_kit.ppo import (
        ExperienceConfig,
        FunctionScorer,
        PPOModels,
        PromptStream,
        RewardModelScorer,
        UpdateConfig,
        collect_experience,
        compute_advantages,
        decode_samples,
        load_ppo_models,
        mean_over_ranks,
        ppo_update,
    )
    from rlhf_kit.rollout import RolloutBuffer
    from rlhf_kit.serving import connect_critic_server
    from rlhf_kit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from rlhf_kit.training.dist import all_reduce_sum, seed_everything
    from rlhf_kit.training.guard import NonFiniteGuard
    from rlhf_kit.training.hf import LoraSettings, make_accelerator, save_hf_model
    from rlhf_kit.training.metrics import MetricsLogger, StepTimer, progress
    from rlhf_kit.training.offload import (
        offload_optimizer_state,
        onload_optimizer_state,
    )
    from rlhf_kit.training.placement import OptimSettings, place_models
    from rlhf_kit.training.run import prepare_metrics_for_resume, start_run, write_json
    from rlhf_kit.training.validate import check_same_tokenizer

    # 1. Check the configuration before touching any model.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    acc = make_accelerator(cfg.mixed_precision)
    device = acc.device
    start_run(  # writable, not used by another run, same settings as the run it resumes
        cfg, cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, may_change=MAY_CHANGE,
        extend_max_steps=cfg.extend_max_steps,
    )  # fmt: skip
    seed_everything(cfg.seed)

    # 2. Models and data; the embedded default makes tiny models and uses the shipped HH sample.
    from recipes._ppo_defaults import fill_defaults

    cfg = fill_defaults(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(cfg.actor)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{cfg.actor}: the tokenizer needs a pad token distinct from EOS")
    check_same_tokenizer(tokenizer, {"--reward-model": cfg.reward_model, "--critic": cfg.critic})
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha)
    updates_per_step = cfg.ppo_epochs * cfg.num_rollout_samples // cfg.global_batch_size
    total = cfg.max_steps * updates_per_step
    remote, server = (None, {})  # with --critic-server, critic and RM live in that job
    if cfg.critic_server is not None:
        remote, server = connect_critic_server(
            cfg.critic_server, vocab_size=len(tokenizer), total_steps=total, value_clip=cfg.value_clip,
            need_scores=cfg.reward_fn is None,
        )  # fmt: skip
    models = load_ppo_models(
        cfg.actor, None if remote else cfg.critic or cfg.reward_model,
        None if cfg.reward_fn or remote else cfg.reward_model, tokenizer,
        lora=lora, gradient_checkpointing=cfg.gradient_checkpointing, device=device,
    )  # fmt: skip
    actor, critic, reference, reward_model = (
        models.actor,
        models.critic,
        models.reference,
        models.reward_model,
    )
    if cfg.reward_fn is not None:
        scorer, stats = FunctionScorer(load_reward_fn(cfg.reward_fn), tokenizer), None
    else:  # the server scores with its reward model and knows its statistics
        scorer = None if remote else RewardModelScorer(reward_model)
        stats = server.get("reward_stats") if remote else load_reward_stats(cfg.reward_model)
        stats = stats if cfg.standardize_scores else None
    train_ids, _ = tokenize_prompts(load_prompts(cfg.train_prompts), tokenizer, cfg.max_prompt_length)
    val_ids, _ = tokenize_prompts(
        load_prompts(cfg.val_prompts)[: cfg.num_val_samples], tokenizer, cfg.max_prompt_length
    )
    stream = PromptStream(train_ids, seed=cfg.seed)
    collate = PromptCollator(tokenizer.pad_token_id)

    # 3. Compile, shard (FSDP2 with --fsdp or accelerate/fsdp.yaml) or prepare; optimizers and schedules.
    trainable = {"actor": (actor, OptimSettings(cfg.actor_lr, cfg.actor_min_lr, cfg.weight_decay))}
    if critic is not None:  # else it trains in the --critic-server job
        trainable["critic"] = (critic, OptimSettings(cfg.critic_lr, cfg.critic_min_lr, cfg.weight_decay))
    placed = place_models(
        acc, trainable, [reference, reward_model], warmup_steps=cfg.warmup_steps, total_steps=total,
        fsdp=cfg.fsdp, master_weights=cfg.master_weights, compile_blocks=cfg.compile_blocks,
    )  # fmt: skip
    actor, critic = placed.models["actor"], placed.models.get("critic")
    actor_opt, critic_opt = placed.optimizers["actor"], placed.optimizers.get("critic")
    actor_sched, critic_sched = placed.schedulers["actor"], placed.schedulers.get("critic")
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    exp_cfg = ExperienceConfig(
        temperature=cfg.temperature,
        kl_estimator=cfg.kl_estimator,
        gamma=cfg.gamma,
        lam=cfg.lam,
        normalize_advantages=cfg.normalize_advantages,
        missing_eos_penalty=cfg.missing_eos_penalty,
        score_mean=stats["mean"] if stats else 0.0,
        score_std=stats["std"] if stats else 1.0,
        micro_batch_size=cfg.rollout_micro_batch_size,
    )
    policy_loss, value_loss = PPOPolicyLoss(cfg.ratio_eps, cfg.entropy_coef), ValueLoss(cfg.value_clip)
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stop_strings=cfg.stop_strings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.backend == "compiled":
        from rlhf_kit.generation.compiled import CompiledBackend

        # A dedicated inference copy (bf16 on GPU); weights stream in from the trainer after each step.
        dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32
        infer = AutoModelForCausalLM.from_pretrained(cfg.actor, dtype=dtype).to(device)
        backend = CompiledBackend(
            infer, max_batch_size=cfg.rollout_micro_batch_size,
            max_seq_len=cfg.max_prompt_length + cfg.max_new_tokens, tokenizer=tokenizer,
        )  # fmt: skip
    else:
        backend = HFBackend(acc.unwrap_model(actor), tokenizer)
    dynamic = cfg.dynamic_dispatch and acc.num_processes > 1
    if dynamic and cfg.backend == "hf" and placed.sharded:
        raise ValueError(
            "--dynamic-dispatch with FSDP needs --backend compiled (sharded generate is collective)"
        )

    def sync_weights() -> None:
        """Stream the trainer's weights (FSDP2 shards gathered, LoRA merged) into the inference copy."""
        if cfg.backend == "compiled":
            backend.update_weights(iter_full_params(actor))

    # 4. Resume.
    step = 0
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    ckpt = {"models": placed.models, "optimizers": placed.optimizers, "schedulers": placed.schedulers}
    if cfg.resume and latest_checkpoint(ckpt_dir) is not None:
        step, extra = load_checkpoint(ckpt_dir, **ckpt)
        if remote:  # the server's state saved with this step (paths under its --output-dir)
            remote.load(f"checkpoints/step_{step}")
        kl_ctl.load_state_dict(extra["kl_controller"])
        stream.load_state_dict(extra["prompt_stream"])
        prepare_metrics_for_resume(cfg.output_dir, step)  # rows past the checkpoint are logged again
        sync_weights()
        acc.print(f"resumed from step {step}")
    logger = MetricsLogger(cfg.output_dir, cfg.report_to, run_name=cfg.run_name, config=asdict(cfg))
    timer = StepTimer()
    guard = NonFiniteGuard(cfg.max_bad_steps)  # NaN/inf rewards, losses, gradients: skipped, counted
    update_cfg = UpdateConfig(
        mini_batch_size=cfg.global_batch_size // acc.num_processes,
        micro_batch_size=cfg.micro_batch_size,
        ppo_epochs=cfg.ppo_epochs,
        max_grad_norm=cfg.max_grad_norm,
        train_critic=remote is None,
    )

    models = PPOModels(actor, critic, reference, reward_model, models.reference_fn)  # prepared ones

    def rollout(prompts: list[list[int]]):
        return collect_experience(
            backend, prompts, collate, params, models, scorer, exp_cfg,
            generation_batch_size=cfg.rollout_micro_batch_size, device=device,
            pad_token_id=tokenizer.pad_token_id, dynamic=dynamic, offload_frozen=cfg.offload_idle_models,
            phase=timer, autocast=acc.autocast, remote=remote,
        )  # fmt: skip

    # 5. The PPO loop.
    for m in placed.models.values():
        m.train()
    result: dict = {}
    bar = progress(total=cfg.max_steps, initial=step, desc="ppo")
    while step < cfg.max_steps:
        timer.reset()
        if cfg.offload_optimizer:
            for opt in ckpt["optimizers"].values():
                offload_optimizer_state(opt)
        rank, world = (0, 1) if dynamic else (acc.process_index, acc.num_processes)
        data, rollout_stats = rollout(stream.next_batch(cfg.num_rollout_samples, rank, world))
        if cfg.offload_optimizer:
            for opt in ckpt["optimizers"].values():
                onload_optimizer_state(opt, device)
        data = guard.drop_samples(data)  # samples with a NaN/inf score, log-prob or value
        data, exp_stats = compute_advantages(data, kl_ctl.value, exp_cfg)
        buffer = RolloutBuffer(pad_token_id=tokenizer.pad_token_id, seed=cfg.seed + step)
        buffer.set_data(data)
        update_cfg.train_actor = step >= cfg.critic_warmup_steps
        with timer("train"), acc.autocast():
            train_stats = ppo_update(
                actor, critic, actor_opt, critic_opt, buffer, policy_loss, value_loss, update_cfg, exp_cfg,
                backward=placed.backward, clip_grad=guard.clip(placed.clip_grad),
            )  # fmt: skip
            if remote:  # the critic half of the update, on the server (same mini-batch order)
                train_stats |= remote.train_rollout(data, update_cfg, seed=cfg.seed + step)
        for _ in range(updates_per_step):
            if update_cfg.train_actor:
                actor_sched.step()
            if critic_sched:
                critic_sched.step()
        kl_ctl.update(exp_stats["kl/seq_mean"], cfg.num_rollout_samples)
        step += 1
        sync_weights()
        times = timer.summary()
        n_tokens = all_reduce_sum([rollout_stats.pop("rollout/generated_tokens")], device)[0]
        result = {
            **mean_over_ranks({**exp_stats, **train_stats}, device),
            **times,
            **rollout_stats,
            "throughput/generated_tokens_per_s": n_tokens / max(times.get("time/generate", 0.0), 1e-9),
            "lr/actor": actor_sched.get_last_lr()[0],
            **({"lr/critic": critic_sched.get_last_lr()[0]} if critic_sched else {}),  # else from the server
        }
        result |= guard.end_step(step, result, device)  # past --max-bad-steps: stops, naming the step
        logger.log(result, step)
        bar.update(1)
        bar.set_postfix(score=f"{exp_stats['reward/score_mean']:.3f}", kl=f"{exp_stats['kl/seq_mean']:.3f}")

        # 6. Validation on held-out prompts, with a table of samples.
        if step % cfg.val_check_interval == 0 or step == cfg.max_steps:
            actor.eval()
            vdata, _ = rollout(val_ids if dynamic else val_ids[acc.process_index :: acc.num_processes])
            vdata, vstats = compute_advantages(vdata, kl_ctl.value, exp_cfg)
            keep = ("reward/score_mean", "reward/raw_score_mean", "kl/seq_mean", "response/length_mean")
            logger.log(mean_over_ranks({"val/" + k: vstats[k] for k in keep}, device), step)
            rows = [[step, *row] for row in decode_samples(tokenizer, vdata)]
            logger.log_table("val/samples", rows, ["step", "prompt", "response", "score"], step)
            actor.train()

        # 7. Checkpoint everything an exact resume needs.
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            if remote:  # first, so `latest` never points at a step the server has not saved
                remote.save(f"checkpoints/step_{step}", keep_last=cfg.keep_last)
            save_checkpoint(
                ckpt_dir, step, **ckpt, keep_last=cfg.keep_last,
                extra={"kl_controller": kl_ctl.state_dict(), "prompt_stream": stream.state_dict()},
            )  # fmt: skip
    bar.close()

    # 8. Final models as standard HF directories (FSDP2 shards gathered, LoRA merged).
    save_hf_model(actor, os.path.join(cfg.output_dir, "final"), tokenizer)
    if remote:
        remote.save("final")  # <server --output-dir>/final/critic
    else:
        save_hf_model(acc.unwrap_model(critic).model, os.path.join(cfg.output_dir, "critic"), tokenizer)
    if acc.is_main_process:
        write_json(os.path.join(cfg.output_dir, "final", "ppo_config.json"), asdict(cfg))
    logger.close()
    return result


if __name__ == "__main__":
    from rlhf_kit.errors import RunError
    from rlhf_kit.training.run import one_line_errors

    config = tyro.cli(PPOConfig)
    with one_line_errors("ppo.py"):  # configuration errors: one line, before any model is loaded
        validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    with one_line_errors("ppo.py", RunError):  # used output dir, full disk, NaN past the limit: one line
        main(config)
