"""PPO with four models: actor, critic, frozen reference and reward model (or a reward function);
or critic-free (--advantage-estimator rloo|grpo|dr_grpo|reinforce_pp): no critic at all.

    python recipes/ppo.py                                  # embedded default: tiny models, shipped HH
    accelerate launch recipes/ppo.py --actor sft/final --reward-model rm/final \
        --train-prompts data/hh/train_prompts.jsonl --val-prompts data/hh/test_prompts.jsonl

Each step: take --num-rollout-samples prompts, generate in micro-batches, score with the four
models, shape rewards (per-token KL + score on the last token), GAE, then --ppo-epochs passes of
clipped policy and value updates in mini-batches of --global-batch-size. Defaults follow
NeMo-Aligner where they fit a CPU demo; see docs/ppo.md for the full-scale values.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tyro

from recipes._ppo_defaults import fill_defaults
from rlhf_kit.data import PromptCollator
from rlhf_kit.data.tokenizer import load_tokenizer
from rlhf_kit.estimators import needs_critic
from rlhf_kit.models.loading import quiet_weight_progress_bars
from rlhf_kit.ppo import (
    EstimatorOptions,
    advantages_now_or_in_update,
    check_estimator_options,
    check_run_settings,
    closing_metrics,
    collect_experience,
    experience_config,
    generation_batch_size,
    generation_cache_mode,
    load_ppo_models,
    load_prompt_sets,
    make_backend,
    make_kl_controller,
    make_losses,
    make_scorer,
    memory_budget,
    optimizer_state_offloaded,
    place_ppo_models,
    ppo_update,
    repeat_prompts,
    resume_ppo,
    sampling_params,
    save_final_models,
    save_ppo_checkpoint,
    step_metrics,
    step_schedules,
    update_config,
    updates_per_step,
    validation_metrics,
)
from rlhf_kit.rollout import RolloutBuffer
from rlhf_kit.serving import connect_critic_server
from rlhf_kit.training.checkpoint import latest_checkpoint
from rlhf_kit.training.dist import env_world_size, seed_everything
from rlhf_kit.training.guard import NonFiniteGuard
from rlhf_kit.training.hf import LoraSettings, make_accelerator
from rlhf_kit.training.metrics import MetricsLogger, StepTimer, progress
from rlhf_kit.training.model_card import write_model_card
from rlhf_kit.training.options import (
    TrainingOptions,
    check_fp8_backward,
    check_optimizer_choice,
    resolve_compile_blocks,
    settle_ppo_master_weights,
)
from rlhf_kit.training.placement import OptimSettings
from rlhf_kit.training.profiling import StepProfiler
from rlhf_kit.training.run import start_run
from rlhf_kit.training.summary import print_summary
from rlhf_kit.training.validate import check_same_tokenizer


@dataclass
class PPOConfig(TrainingOptions, EstimatorOptions):
    """PPO training. Every field is a command-line flag (``--field-name``); the shared optimisation and
    bookkeeping fields come first (rlhf_kit.training.options.TrainingOptions), then the estimator's
    (rlhf_kit.ppo.options.EstimatorOptions)."""

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
    also owns the critic's optimisation settings (--critic, --critic-lr, ... do not apply here). Its
    token, if any, is read from $RLHF_KIT_SERVER_TOKEN; each rank of a multi-rank job sends its share."""
    critic_server_timeout: float = 600.0
    """Seconds the critic server may stay silent during one request before it fails (naming the URL)."""
    train_prompts: str | None = None
    """Prompt file ({"text"} / {"prompt"} / chat messages per line). None: the shipped HH sample."""
    val_prompts: str | None = None
    """Held-out prompts for validation. None: --val-size prompts held out of --train-prompts (never trained
    on), or with no --train-prompts either, the test split of the shipped HH sample."""
    val_size: int | None = None
    """Prompts (a count, >= 1 and below the file's prompt count) held out of --train-prompts for validation
    when no --val-prompts is given; picked with --seed. None: --num-val-samples."""
    output_dir: str = "outputs/ppo"
    """Where checkpoints, metrics.jsonl and the final models go."""

    # --- rollout -------------------------------------------------------------------------------
    max_steps: int = 4
    """PPO steps: one rollout of --num-rollout-samples prompts plus its updates each."""
    num_rollout_samples: int = 16
    """Prompts per step across all ranks (NeMo-Aligner 512; TRL: its batch size, 64-512 usual)."""
    rollout_micro_batch_size: int = 64
    """Prompts per generation call and scoring forward on each rank, at most its share (TRL 64; NeMo 8)."""
    max_prompt_length: int = 128
    """Prompts are left-truncated to this many tokens, keeping the end of the dialogue (NeMo-Aligner:
    half the sequence length)."""
    max_new_tokens: int = 24
    """Longest response in tokens, EOS included (NeMo-Aligner: half the sequence length; TRL 53)."""
    min_new_tokens: int = 1
    """EOS is masked out until a response has this many tokens (NeMo-Aligner 1)."""
    temperature: float = 1.0
    """Sampling temperature, > 0 (NeMo-Aligner 1.0, TRL 0.7); actor and reference log-probs are
    recomputed with it."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables top-k (NeMo-Aligner 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1.0 disables it (NeMo-Aligner 1.0)."""
    stop_strings: tuple[str, ...] = ()
    """Generation also ends at any of these strings (besides EOS)."""
    backend: Literal["auto", "hf", "compiled"] = "auto"
    """Generation backend: HF generate, or the static-cache compiled decoder (CUDA graphs on a GPU:
    several times HF's tokens/s, docs/benchmarks.md). auto: compiled on CUDA, hf on CPU."""
    dynamic_dispatch: bool = False
    """With several ranks, hand out rollout micro-batches first come first served and rebalance the
    samples before scoring (needs local generation: --backend compiled, or no FSDP)."""

    # --- rewards and advantages ----------------------------------------------------------------
    kl_coef: float = 0.02
    """Initial coefficient beta of the per-token KL penalty -beta * kl_t (NeMo-Aligner 0.01, its tutorial
    0.02; TRL 0.05; 0.001-0.1 usual)."""
    kl_estimator: Literal["k1", "abs", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 log-ratio (TRL), abs (NeMo-Aligner), k2, k3 (TRL option);
    see rlhf_kit.kl.kl_penalty."""
    adaptive_kl: bool = False
    """Ziegler et al. (2019) adaptive KL controller instead of a fixed coefficient (both references: off)."""
    kl_target: float = 6.0
    """Target KL per sequence, in nats, of the adaptive controller (Ziegler et al. 6.0)."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples (Ziegler et al. 10000)."""
    standardize_scores: bool = True
    """Standardise scores with the RM's saved reward_stats.json (mean, std), so SFT outputs score about 0."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score (after standardisation; 1-10 usual) of responses that never emitted
    EOS. None: no penalty (TRL's default)."""
    gamma: float = 1.0
    """GAE discount gamma in [0, 1] (NeMo-Aligner and TRL 1.0)."""
    lam: float = 0.95
    """GAE lambda in [0, 1] (NeMo-Aligner and TRL 0.95)."""
    normalize_advantages: bool = True
    """Whiten GAE advantages over all valid tokens, statistics over all ranks (gae only; NeMo-Aligner: on)."""

    # --- optimisation (batch sizes, AdamW, LoRA, bookkeeping: rlhf_kit.training.options) -------
    global_batch_size: int = 8
    """Rollout samples per optimizer step across all ranks (NeMo-Aligner 64; TRL: the rollout divided by
    num_mini_batches). Must divide --num-rollout-samples."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank (NeMo-Aligner 1); accumulation fills the global batch.
    Samples are grouped by length and each micro-batch is cut to its own widest one (same gradient)."""
    micro_batch_tokens: int | None = None
    """Micro-batches by a padded-token budget (samples x (longest prompt + longest response)), longest
    first, as veRL's dynamic batch size; None: --micro-batch-size x (--max-prompt-length + --max-new-tokens),
    never more than a full-length fixed micro-batch; 0: --micro-batch-size samples each."""
    micro_batch_memory: float = 0.8
    """On a CUDA GPU, grow that budget once (the update after the first step, measured) to micro-batches
    that fill up to this share of the GPU's memory: below it small models are launch-bound; 0: never."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up of actor and critic, in optimizer steps (NeMo-Aligner 10)."""
    weight_decay: float = 0.1
    """AdamW weight decay of actor and critic (NeMo-Aligner 0.1; never applied to biases and norms)."""
    ppo_epochs: int = 1
    """Passes over each rollout (NeMo-Aligner 1, TRL 4)."""
    ratio_eps: float = 0.2
    """Clip range eps of the policy ratio, kept in [1 - eps, 1 + eps] (NeMo-Aligner ratio_eps 0.2, TRL
    cliprange 0.2; 0.1-0.3 usual)."""
    value_clip: float = 0.2
    """Clip range of the critic's value change per update, in reward units (NeMo-Aligner loss_clip_val 0.2,
    TRL cliprange_value 0.2); 0: plain squared error."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus in the policy loss (NeMo-Aligner entropy_bonus 0.0; 0-0.01 usual)."""
    critic_warmup_steps: int = 0
    """PPO steps at the start that train only the critic (NeMo-Aligner 0)."""
    actor_lr: float = 1e-5
    """Peak learning rate of the actor (NeMo-Aligner 9e-7, TRL 3e-6)."""
    actor_min_lr: float = 1e-6
    """The actor's cosine schedule ends here (NeMo-Aligner 9e-8)."""
    critic_lr: float = 1e-5
    """Peak learning rate of the critic (NeMo-Aligner 9e-6)."""
    critic_min_lr: float = 1e-6
    """The critic's cosine schedule ends here (NeMo-Aligner 9e-7)."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto: bf16 autocast when the accelerator supports it, else fp32; on one bf16 GPU without --fsdp or
    LoRA also bf16 actor/critic weights with fp32 masters (--master-weights). no: fp32; bf16: autocast."""
    fsdp: bool = False
    """Shard the four models with FSDP2 when several processes run (implied by accelerate/fsdp.yaml)."""
    offload_idle_models: bool = False
    """Keep reference and reward model on CPU (pinned) except while scoring."""
    offload_optimizer: bool = False
    """Move optimizer state to CPU during generation and scoring."""
    compile_blocks: Literal["auto", "on", "off"] = "auto"
    """torch.compile each transformer block of the four models: fused kernels per layer, tens of seconds of
    compilation at the first step. auto: on with one CUDA GPU, all weights trained, no FSDP and no gradient
    checkpointing; off on CPU, where compiling costs more than it saves. off: the log-probs uncompiled too."""
    generation_cache: Literal["auto", "keep", "release"] = "auto"
    """The compiled backend's KV cache and CUDA graphs between rollouts: keep (no re-capture each step),
    release (memory back to training), auto (keep when they take <= 5% of the GPU, release with offloading)."""

    # --- bookkeeping ---------------------------------------------------------------------------
    val_check_interval: int = 2
    """Validate on held-out prompts every this many PPO steps, and after the last one (NeMo-Aligner 10)."""
    num_val_samples: int = 8
    """Held-out prompts per validation (the first N of --val-prompts)."""
    save_interval: int = 2
    """Save a resumable checkpoint every this many PPO steps, and after the last one (NeMo-Aligner: the
    validation interval)."""


#: Fields checked > 0 / >= 0 before anything is loaded (every float field is also checked finite).
POSITIVE = ("max_steps", "num_rollout_samples", "rollout_micro_batch_size", "max_prompt_length",
            "max_new_tokens", "actor_lr", "critic_lr", "ppo_epochs", "val_check_interval", "save_interval")  # fmt: skip
NON_NEGATIVE = ("micro_batch_tokens", "actor_min_lr", "critic_min_lr", "kl_coef", "entropy_coef", "ratio_eps", "value_clip",
                "weight_decay", "max_grad_norm", "warmup_steps", "critic_warmup_steps", "max_bad_steps")  # fmt: skip
#: Settings that may change on --resume besides output and reporting ones (they change no weights).
MAY_CHANGE = ("offload_idle_models", "offload_optimizer", "generation_cache")


def validate(cfg: PPOConfig, world_size: int) -> int:
    """Check the configuration before loading anything and settle ``--mixed-precision auto``'s master
    weights (:func:`rlhf_kit.training.options.settle_ppo_master_weights`); returns gradient accumulation."""
    from rlhf_kit.training.batching import resolve_batch_sizes
    from rlhf_kit.training.metrics import check_report_to
    from rlhf_kit.training.run import check_numbers

    check_report_to(cfg.report_to)  # an unknown tracker or a missing package: one line now
    check_numbers(cfg, positive=POSITIVE, non_negative=NON_NEGATIVE, unit_interval=("gamma", "lam"))
    accum = resolve_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, world_size)
    check_estimator_options(cfg, world_size)
    check_run_settings(cfg, world_size)  # batch arithmetic, sampling, model paths, prompt files, reward fn
    check_optimizer_choice(cfg, world_size=world_size, fsdp=cfg.fsdp)  # before auto's master weights
    note = settle_ppo_master_weights(cfg, cfg.mixed_precision, world_size=world_size, fsdp=cfg.fsdp)
    if note:  # only ever with one process
        print(note)
    check_fp8_backward(cfg)  # needs the settled master weights
    compiled = resolve_compile_blocks(cfg.compile_blocks, cfg, world_size=world_size, fsdp=cfg.fsdp)
    if compiled and cfg.compile_blocks == "auto":
        print(
            "--compile-blocks auto: every transformer block compiled, the first step pays it (--compile-blocks off)"
        )
    return accum


def main(cfg: PPOConfig) -> dict:
    # 1. Check the configuration before touching any model; accelerator and seeds.
    validate(cfg, env_world_size())  # also settles what --mixed-precision auto means here
    acc = make_accelerator(cfg.mixed_precision, cfg.cudnn_attention)
    device = acc.device
    profiler = StepProfiler(cfg.profile_steps, os.path.join(cfg.output_dir, "profile"), acc.is_main_process)
    start_run(  # writable, not used by another run, same settings as the run it resumes
        cfg, cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, may_change=MAY_CHANGE,
        extend_max_steps=cfg.extend_max_steps,
    )  # fmt: skip
    seed_everything(cfg.seed)
    quiet_weight_progress_bars()  # transformers' per-file load/save bars (RLHF_KIT_HF_PROGRESS=1 keeps them)

    # 2. Models and data; the embedded default makes tiny models and uses the shipped HH sample.
    cfg = fill_defaults(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    tokenizer = load_tokenizer(cfg.actor, padding_side="left")  # pads with EOS if it has no pad token
    check_same_tokenizer(tokenizer, {"--reward-model": cfg.reward_model, "--critic": cfg.critic})
    updates = updates_per_step(cfg)
    use_critic = needs_critic(cfg.advantage_estimator)  # critic-free estimators build no critic
    total = cfg.max_steps * updates
    remote, server = connect_critic_server(  # with --critic-server, critic and RM live in that job
        cfg.critic_server, vocab_size=len(tokenizer), total_steps=total, value_clip=cfg.value_clip,
        need_scores=cfg.reward_fn is None, timeout=cfg.critic_server_timeout,
    ) if cfg.critic_server is not None else (None, {})  # fmt: skip
    models = load_ppo_models(
        cfg.actor, None if remote or not use_critic else cfg.critic or cfg.reward_model,
        None if cfg.reward_fn or remote else cfg.reward_model, tokenizer,
        lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha), gradient_checkpointing=cfg.gradient_checkpointing,
        device=device,
    )  # fmt: skip
    scorer, stats = make_scorer(tokenizer, reward_fn=cfg.reward_fn, reward_model=models.reward_model,
        reward_model_path=cfg.reward_model, remote=remote is not None, server_stats=server.get("reward_stats"),
        standardize=cfg.standardize_scores, packed=cfg.packed_passes)  # fmt: skip
    stream, val_ids = load_prompt_sets(cfg, tokenizer, log=acc.print)  # tokenised, left-truncated

    # 3. Compile, shard (FSDP2 with --fsdp or accelerate/fsdp.yaml) or prepare; optimizers and schedules.
    models, placed = place_ppo_models(
        acc, models, OptimSettings(cfg.actor_lr, cfg.actor_min_lr, cfg.weight_decay),
        OptimSettings(cfg.critic_lr, cfg.critic_min_lr, cfg.weight_decay), warmup_steps=cfg.warmup_steps,
        total_steps=total, fsdp=cfg.fsdp, master_weights=cfg.master_weights, optimizer=cfg.optimizer,
        compile_blocks=resolve_compile_blocks(cfg.compile_blocks, cfg, world_size=acc.num_processes, fsdp=cfg.fsdp),
        fp8_backward=cfg.fp8_backward,
    )  # fmt: skip
    actor, critic, opts, scheds = models.actor, models.critic, placed.optimizers, placed.schedulers

    # 4. The step's pieces: KL controller, scoring, losses, generation backend (and its weight sync).
    kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    exp_cfg = experience_config(cfg, stats, device)
    policy_loss, value_loss = make_losses(cfg, use_critic)  # no value loss without a critic
    dynamic = cfg.dynamic_dispatch and acc.num_processes > 1
    gen_batch = generation_batch_size(cfg, acc.num_processes, dynamic)  # also the KV cache's rows
    backend, sync_weights = make_backend(
        cfg.backend, actor, tokenizer, actor_path=cfg.actor, accelerator=acc, dynamic=dynamic,
        max_batch_size=gen_batch, max_seq_len=cfg.max_prompt_length + cfg.max_new_tokens, sharded=placed.sharded,
    )  # fmt: skip
    timer = StepTimer()
    rollout = partial(
        collect_experience, backend, collate=PromptCollator(tokenizer.pad_token_id),
        params=sampling_params(cfg, tokenizer), models=models, scorer=scorer, cfg=exp_cfg,
        generation_batch_size=gen_batch, device=device, pad_token_id=tokenizer.pad_token_id,
        dynamic=dynamic, offload_frozen=cfg.offload_idle_models, phase=timer, autocast=acc.autocast, remote=remote,
        generation_cache=generation_cache_mode(cfg),
    )  # fmt: skip

    # 5. Resume: weights, optimizers, schedules, KL controller, data position (and the server's state).
    step, ckpt_dir = 0, os.path.join(cfg.output_dir, "checkpoints")
    ckpt = {"models": placed.models, "optimizers": opts, "schedulers": scheds}
    budget = memory_budget(cfg, acc.num_processes, device)  # micro-batches grown to the GPU's memory
    state = {"kl_controller": kl_ctl, "prompt_stream": stream, "remote": remote, "budget": budget}
    if cfg.resume and latest_checkpoint(ckpt_dir) is not None:
        step = resume_ppo(ckpt_dir, ckpt, output_dir=cfg.output_dir, **state)
        sync_weights()
        acc.print(f"resumed from step {step}")
    logger = MetricsLogger(cfg.output_dir, cfg.report_to, run_name=cfg.run_name, config=asdict(cfg))
    update_cfg = update_config(cfg, acc.num_processes, train_critic=remote is None and use_critic)
    guard = NonFiniteGuard(cfg.max_bad_steps)  # NaN/inf rewards, losses, gradients: skipped, counted

    # 6. The PPO loop: rollout, advantages, update (the critic half on the server with --critic-server).
    for m in placed.models.values():
        m.train()
    result, vstats = {}, {}
    bar = progress(total=cfg.max_steps, initial=step, desc="ppo")
    while step < cfg.max_steps:
        timer.reset()
        profiler.begin(step + 1)  # --profile-steps: this step under torch.profiler
        rank, world = (0, 1) if dynamic else (acc.process_index, acc.num_processes)
        with optimizer_state_offloaded(opts.values(), device, enabled=cfg.offload_optimizer):
            prompts = stream.next_batch(cfg.num_rollout_samples, rank, world)  # then K in a row: groups
            data, rollout_stats = rollout(repeat_prompts(prompts, cfg.samples_per_prompt))
        data = guard.drop_samples(data, cfg.samples_per_prompt)  # NaN/inf score, log-prob or value: masked
        data, exp_stats, advantages = advantages_now_or_in_update(data, kl_ctl.value, exp_cfg)
        buffer = RolloutBuffer(pad_token_id=tokenizer.pad_token_id, seed=cfg.seed + step)
        buffer.set_data(data)
        update_cfg.train_actor = step >= cfg.critic_warmup_steps
        with timer("train"), acc.autocast():
            # the critic half of the update, on the server (same mini-batch order), while the actor trains
            critic_update = remote.submit_train_rollout(
                data, update_cfg, seed=cfg.seed + step, rank=acc.process_index, world_size=acc.num_processes
            ) if remote else None  # fmt: skip
            train_stats = ppo_update(
                actor, critic, opts["actor"], opts.get("critic"), buffer, policy_loss, value_loss, update_cfg, exp_cfg,
                backward=placed.backward, clip_grad=guard.clip(placed.clip_grad), budget=budget, advantages=advantages)  # fmt: skip
            if critic_update is not None:
                train_stats |= critic_update.result()
        step_schedules(scheds, updates, train_actor=update_cfg.train_actor)
        profiler.end()
        # the KL that scoring measured, else the update's (when it skips scoring's)
        kl_seq = exp_stats.get("kl/seq_mean", train_stats.get("kl/seq_mean"))
        kl_ctl.update(kl_seq, cfg.num_rollout_samples)
        step += 1
        sync_weights()
        result = step_metrics(exp_stats, train_stats, rollout_stats, timer.summary(), scheds, device)
        result |= guard.end_step(step, result, device)  # past --max-bad-steps: stops, naming the step
        logger.log(result, step)
        bar.update(1)
        bar.set_postfix(score=f"{result['reward/score_mean']:.3f}", kl=f"{kl_seq:.3f}")

        # 7. Validation on held-out prompts, with a table of samples.
        if step % cfg.val_check_interval == 0 or step == cfg.max_steps:
            actor.eval()
            val = val_ids if dynamic else val_ids[acc.process_index :: acc.num_processes]
            vstats, rows = validation_metrics(rollout, val, kl_ctl.value, exp_cfg, tokenizer, step, device)
            logger.log(vstats, step)
            logger.log_table("val/samples", rows, ["step", "prompt", "response", "score"], step)
            actor.train()

        # 8. Checkpoint everything an exact resume needs (the server's state first).
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_ppo_checkpoint(ckpt_dir, step, ckpt, keep_last=cfg.keep_last, **state)
    bar.close()

    # 9. Final models as standard HF directories (FSDP2 shards gathered, LoRA merged).
    saved = save_final_models(cfg.output_dir, actor, critic, tokenizer, acc, asdict(cfg), remote)
    write_model_card(os.path.join(cfg.output_dir, "final"), "ppo", asdict(cfg), result)  # final/README.md
    logger.close()
    saved["metrics"] = os.path.join(cfg.output_dir, "metrics.jsonl")
    print_summary("ppo", saved, closing_metrics(result, vstats))  # paths, last step, last validation
    return result


if __name__ == "__main__":
    from rlhf_kit.errors import RunError
    from rlhf_kit.training.run import one_line_errors

    config = tyro.cli(PPOConfig)
    with one_line_errors("ppo.py"):  # configuration errors: one line, before any model is loaded
        validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    with one_line_errors("ppo.py", RunError):  # used output dir, full disk, NaN past the limit: one line
        main(config)
