"""Train a reward model on comparison data (Bradley-Terry loss on chosen vs rejected).

    python recipes/reward_model.py                                  # embedded default: tiny model, HH sample
    python recipes/reward_model.py --model out/sft/final --train-data data/hh/train_comparisons.jsonl \
        --test-data data/hh/test_comparisons.jsonl --output-dir out/rm
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/reward_model.py --model ...

Writes ``<output-dir>/metrics.jsonl``, checkpoints under ``<output-dir>/checkpoints`` (``--resume``
continues the latest) and ``<output-dir>/final``: an HF directory that
``AutoModelForSequenceClassification.from_pretrained`` loads, with ``reward_stats.json`` (mean/std of
validation rewards, also ``reward_mean``/``reward_std`` in its config) for standardising PPO rewards.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from _defaults import (
    PRETRAINED_LR,
    PRETRAINED_MAX_LENGTH,
    TINY_LR,
    TINY_MAX_LENGTH,
    default_data,
    default_model,
)

from rlhf_kit.data import PairCollator, hold_out, load_comparisons, pair_lengths, tokenize_pairs
from rlhf_kit.losses import PairwiseRewardLoss
from rlhf_kit.models.fp8 import convert_to_fp8_backward
from rlhf_kit.models.loading import quiet_weight_progress_bars
from rlhf_kit.models.transfer import batch_to_device
from rlhf_kit.training import (
    MetricsLogger,
    check_model_path,
    check_path_exists,
    cosine_schedule,
    load_checkpoint,
    make_optimizer,
    progress,
    resolve_batch_sizes,
    save_checkpoint,
    seed_everything,
)
from rlhf_kit.training.batching import BatchPlan, step_micro_batches
from rlhf_kit.training.dist import end_process_group, env_world_size
from rlhf_kit.training.evaluation import evaluate_pairs, pair_scores
from rlhf_kit.training.guard import NonFiniteGuard
from rlhf_kit.training.hf import (
    LoraSettings,
    load_for_training,
    make_accelerator,
    save_hf_model,
)
from rlhf_kit.training.metrics import Averager, check_report_to, compile_stats, device_memory_stats
from rlhf_kit.training.model_card import write_model_card
from rlhf_kit.training.options import (
    SupervisedOptions,
    check_fp8_backward,
    check_optimizer_choice,
    settle_speed_defaults,
)
from rlhf_kit.training.profiling import StepProfiler
from rlhf_kit.training.run import (
    CHECKPOINTS,
    check_finite_fields,
    check_non_negative,
    check_positive,
    one_line_errors,
    start_run,
    write_json,
)
from rlhf_kit.training.step import accumulate, optimizer_step
from rlhf_kit.training.summary import print_summary, run_outputs

#: Settings that may change on --resume besides output and reporting ones (they change no weights).
MAY_CHANGE = ("val_check_interval", "eval_batch_size")


@dataclass
class Config(SupervisedOptions):
    """Train a reward model (AutoModelForSequenceClassification, one label) on chosen/rejected pairs."""

    model: str | None = None
    """HF model directory or hub id (a pretrained or SFT causal LM gets a fresh score head). Unset: a
    random-init tiny llama and BPE tokenizer are built under <output-dir>/tiny_reward (embedded default)."""
    train_data: Path | None = None
    """Comparison file (jsonl: {"chosen","rejected"} or NeMo {"text"} line pairs). Unset: the shipped HH sample."""
    val_data: Path | None = None
    """Validation comparison file. Unset: --val-size pairs are held out of the training data."""
    test_data: Path | None = None
    """Test comparison file, evaluated once after training. Unset with default data: the HH test split."""
    val_size: int = 128
    """Pairs held out of the training data for validation when --val-data is not given."""
    output_dir: Path = Path("outputs/reward_model")
    """Where metrics.jsonl, checkpoints/ and final/ are written."""
    max_length: int | None = None
    """Longest chosen/rejected sequence in tokens (EOS included). Unset: 256 for the embedded default
    (keeps the CPU run to minutes), else 1024."""
    too_long: Literal["drop", "truncate"] = "drop"
    """Pairs with a side over --max-length are dropped or truncated (counted and reported either way)."""
    margin: float = 0.0
    """Margin in the pairwise loss -logsigmoid(r_chosen - r_rejected - margin)."""
    center_coef: float = 0.0
    """Weight of the reward-centring term mean((r_chosen + r_rejected)^2)."""
    group_by_length: bool = True
    """Group pairs of similar length into the same global batch (less padding)."""
    micro_batch_tokens: int | None = None
    """Padded tokens per micro-batch (2 x pairs x the longest side): a step's pairs, longest first, are
    cut into micro-batches that fit, so short pairs go many at a time and long ones few (every rank runs
    as many as the rank that needs most). Unset: 2 x --micro-batch-size x --max-length, so no micro-batch
    is larger than --micro-batch-size pairs at full length (3x the pairs/s of fixed micro-batches on
    SmolLM2-135M, docs/benchmarks.md). 0: fixed micro-batches of --micro-batch-size pairs."""
    liger_kernel: bool = False
    """Fused RMSNorm / SwiGLU / rotary Triton kernels from liger-kernel (CUDA; the [liger] extra)."""
    compile_blocks: bool = False
    """torch.compile each transformer block (dynamic shapes: lengths change from batch to batch)."""
    packed_passes: Literal["auto", "on", "off"] = "auto"
    """Score each micro-batch padding-free: its sequences end to end in one row under variable-length
    flash attention (rlhf_kit.models.varlen). auto: on CUDA in bf16/fp16 for the model types verified
    (rlhf_kit.models.varlen.PACKED_MODEL_TYPES) of hidden size 1024 or more; on: pack any verified model
    (refuse others); off: padded rows."""


def check_config(cfg: Config) -> int:
    """Every check that needs no model: paths, sizes, batch arithmetic. Returns gradient accumulation."""
    if cfg.model is not None:
        check_model_path(cfg.model)
    for name, what in (
        ("train_data", "training data"),
        ("val_data", "validation data"),
        ("test_data", "test data"),
    ):
        if getattr(cfg, name) is not None:
            check_path_exists(getattr(cfg, name), what)
    check_report_to(cfg.report_to)  # an unknown tracker or a missing package: one line now
    check_finite_fields(cfg)  # --lr nan / inf: one line, before anything is loaded
    check_non_negative(
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, max_bad_steps=cfg.max_bad_steps
    )
    check_positive(
        max_length=cfg.max_length,
        eval_batch_size=cfg.eval_batch_size,
        max_steps=cfg.max_steps,
        epochs=cfg.epochs,
        lr=cfg.lr,
        val_check_interval=cfg.val_check_interval,
        save_interval=cfg.save_interval,
        keep_last=cfg.keep_last,
    )
    if cfg.val_data is None and cfg.val_size < 1:
        raise ValueError("--val-size must be > 0 when no --val-data is given")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    check_optimizer_choice(cfg, world_size=env_world_size())  # before auto settles the master weights
    if cfg.liger_kernel:
        from rlhf_kit.models.kernels import liger_model_types

        liger_model_types()  # not installed: one line with the install hint, before any model is built
    check_non_negative(micro_batch_tokens=cfg.micro_batch_tokens)
    if cfg.micro_batch_tokens != 0:
        resolve_batch_sizes(cfg.global_batch_size, 1, env_world_size())  # whole pairs on every rank
        return 0  # no fixed accumulation: micro-batches are weighted by their pairs
    return resolve_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, env_world_size())


def load_data(cfg: Config, tokenizer) -> tuple[list, list, list | None]:
    """Tokenised (train, validation, test) pair examples; validation held out of train if not given."""

    def tokenize(path):
        return tokenize_pairs(load_comparisons(path), tokenizer, cfg.max_length, cfg.too_long)[0]

    train = tokenize(cfg.train_data)
    if cfg.val_data is not None:
        val = tokenize(cfg.val_data)
    else:
        if len(train) <= cfg.val_size:
            raise ValueError(
                f"{cfg.train_data}: {len(train)} usable pairs, too few to hold out --val-size {cfg.val_size}"
            )
        train, val = hold_out(train, cfg.val_size, cfg.seed)
    test = tokenize(cfg.test_data) if cfg.test_data is not None else None
    return train, val, test


def main(cfg: Config) -> None:
    prog = "reward_model.py"
    with one_line_errors(prog):
        accum = check_config(cfg)
        note = settle_speed_defaults(cfg, embedded=cfg.model is None, world_size=env_world_size())
        check_fp8_backward(cfg)  # after auto settled the master weights, before any model is built
        accelerator = make_accelerator(cfg.mixed_precision, cfg.cudnn_attention)
        resume_from = start_run(
            cfg, cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, may_change=MAY_CHANGE,
            extend_max_steps=cfg.extend_max_steps,
        )  # fmt: skip
        seed_everything(cfg.seed)
        if note:
            accelerator.print(note)
        quiet_weight_progress_bars()  # transformers' per-file load/save bars (RLHF_KIT_HF_PROGRESS=1 keeps them)
        tiny = cfg.model is None
        if tiny:
            cfg.model = default_model(cfg.output_dir, "reward", cfg.seed)
        if cfg.train_data is None:
            files = default_data(cfg.output_dir)
            cfg.train_data = Path(files["train_comparisons"])
            cfg.test_data = cfg.test_data or Path(files["test_comparisons"])
        from rlhf_kit.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, padding_side="right")  # pads with EOS if it has no pad token
        cfg.max_length = cfg.max_length or (TINY_MAX_LENGTH if tiny else PRETRAINED_MAX_LENGTH)
        if cfg.micro_batch_tokens is None:  # the fixed micro-batch's worst case, shorter pairs packed in
            cfg.micro_batch_tokens = 2 * cfg.micro_batch_size * cfg.max_length
        train, val, test = load_data(cfg, tokenizer)
        lr = cfg.lr or (TINY_LR if tiny else PRETRAINED_LR)
        plan = BatchPlan(
            len(train), cfg.global_batch_size, cfg.seed, pair_lengths(train) if cfg.group_by_length else None
        )
        total = cfg.max_steps or max(1, math.floor(cfg.epochs * plan.steps_per_epoch))
        profiler = StepProfiler(cfg.profile_steps, cfg.output_dir / "profile", accelerator.is_main_process)

    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    model = load_for_training(cfg.model, "reward", lora, cfg.gradient_checkpointing)
    if cfg.liger_kernel:  # fused RMSNorm / SwiGLU / rotary (the same math, fewer kernel launches)
        from rlhf_kit.models.kernels import apply_liger_kernels

        apply_liger_kernels(model)
    convert_to_fp8_backward(model, cfg.fp8_backward)  # FP8 backward products (--fp8-backward; off: nothing)
    if cfg.compile_blocks:
        from rlhf_kit.models.compile import compile_blocks

        compile_blocks(model, dynamic=True)
    optimizer = make_optimizer(  # AdamW (fused on CUDA), with fp32 masters, or 8-bit (--optimizer adamw8bit)
        model, lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), kind=cfg.optimizer,
        master_weights=cfg.master_weights, device=accelerator.device,
    )  # fmt: skip
    scheduler = cosine_schedule(optimizer, min(cfg.warmup_steps, total), total, lr * cfg.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    raw_opt = optimizer.optimizer

    step = 0
    if resume_from is not None:
        step, extra = load_checkpoint(
            resume_from,
            models={"model": model},
            optimizers={"model": raw_opt},
            schedulers={"model": scheduler},
        )
        if extra["global_batch_size"] != cfg.global_batch_size or extra["seed"] != cfg.seed:
            raise SystemExit(f"{prog}: error: --global-batch-size and --seed must match the resumed run")
        accelerator.print(f"resumed from {resume_from} at step {step}")

    config_dict = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    logger = MetricsLogger(cfg.output_dir, cfg.report_to, cfg.project, cfg.run_name, config_dict)
    loss_fn = PairwiseRewardLoss(cfg.margin, cfg.center_coef)
    collate = PairCollator(tokenizer.pad_token_id)

    def validate(split: str, examples: list, at: int) -> dict[str, float]:
        metrics = evaluate_pairs(
            model, examples, collate, cfg.eval_batch_size, device, loss_fn, cfg.packed_passes
        )
        logger.log({f"{split}/{k}": v for k, v in metrics.items()}, at)
        return metrics

    per_rank = cfg.global_batch_size // world
    padded_cost = [2 * n for n in pair_lengths(train)]  # chosen + rejected rows at the longer side
    last = min(total, cfg.stop_at_step or total)
    bar = progress(total=total, initial=step, desc="reward model")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    model.train()
    while step < last:
        profiler.begin(step + 1)  # --profile-steps: this step under torch.profiler
        started = time.perf_counter()
        avg = Averager()
        micro = step_micro_batches(  # under the padded-token budget (0: fixed micro-batches)
            plan, step, rank, world, micro_batch_size=cfg.micro_batch_size, budget=cfg.micro_batch_tokens,
            costs=padded_cost,
        )  # fmt: skip
        for idx in accumulate(accelerator, model, micro):
            batch = batch_to_device(collate([train[j] for j in idx]), device)  # pinned, asynchronous
            chosen, rejected = pair_scores(model, batch, cfg.packed_passes)
            loss, stats = loss_fn(chosen, rejected)  # mean over the micro-batch's pairs
            accelerator.backward(loss / accum if accum else loss * (len(idx) / per_rank))
            for name, value in [("loss", loss.detach()), *stats._asdict().items()]:
                avg.add(name, value, len(idx))
        update = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, guard)
        step += 1
        logs = {f"train/{k}": v for k, v in avg.reduce(device).items()}
        logs.update({f"train/{k}": v for k, v in update.items()})
        logs["train/epoch"] = step / plan.steps_per_epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        profiler.end()
        logs["time/step_s"] = time.perf_counter() - started
        logs["throughput/pairs_per_s"] = cfg.global_batch_size / logs["time/step_s"]
        logs.update(device_memory_stats())
        logs.update(compile_stats())  # a step whose counts rose paid torch.compile
        logs.update(guard.end_step(step, logs, device))  # NaN/inf: skipped, counted, limited
        logger.log(logs, step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['train/loss']:.4f}", acc=f"{logs['train/accuracy']:.2f}")
        if step % cfg.val_check_interval == 0 and step < total:
            validate("val", val, step)
        if step % cfg.save_interval == 0 or step == last < total:
            save_checkpoint(
                cfg.output_dir / CHECKPOINTS,
                step,
                models={"model": model},
                optimizers={"model": raw_opt},
                schedulers={"model": scheduler},
                extra={
                    "global_batch_size": cfg.global_batch_size,
                    "seed": cfg.seed,
                    "examples_seen": step * cfg.global_batch_size,
                },
                keep_last=cfg.keep_last,
            )
    bar.close()
    if step < total:
        accelerator.print(f"stopped at step {step} of {total} (--stop-at-step); continue with --resume")
        logger.close()
        model = None  # as at the end: the process group ends after the DDP model is dropped
        end_process_group(accelerator)
        return

    final_val = validate("val", val, step)
    results = {"val": final_val}
    if test is not None:
        results["test"] = validate("test", test, step)
    final = cfg.output_dir / "final"
    stats = {"reward_mean": final_val["reward_mean"], "reward_std": final_val["reward_std"]}
    save_hf_model(model, final, tokenizer, config_updates=stats)
    write_model_card(final, "reward_model", config_dict, results)  # final/README.md
    if accelerator.is_main_process:
        from rlhf_kit.models.reward import save_reward_stats

        save_reward_stats(
            str(final), stats["reward_mean"], stats["reward_std"], num_pairs=final_val["num_pairs"]
        )
        write_json(cfg.output_dir / "eval_results.json", results)
        print_summary("reward_model", run_outputs(cfg.output_dir, eval_results="eval_results.json"), results)
    logger.close()
    model = None  # its DDP reducer holds the process group, which must end first (end_process_group)
    end_process_group(accelerator)


if __name__ == "__main__":
    from rlhf_kit.errors import RunError

    # a full disk, a run that keeps producing NaN: one line, not a traceback
    with one_line_errors("reward_model.py", RunError):
        main(tyro.cli(Config))
