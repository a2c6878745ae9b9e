"""Supervised fine-tuning: causal-LM loss on responses only (prompt tokens masked), optional packing.

    python recipes/sft.py                                          # embedded default: tiny model, HH sample
    python recipes/sft.py --model org/base --train-data data/hh/train_comparisons.jsonl --output-dir out/sft
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/sft.py --model ...

Trains on the chosen side of comparison files (``--data-format comparisons``) or on text records
(``--data-format text``: ``{"text"}`` split after the last ``--response-marker``, ``{"prompt",
"response"}`` or ``{"messages"}``). Writes ``<output-dir>/metrics.jsonl``, resumable checkpoints and
``<output-dir>/final``: a causal-LM HF directory with its tokenizer, the ``--model`` of the RM and PPO
recipes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro
from _defaults import (
    PRETRAINED_LR,
    PRETRAINED_MAX_LENGTH,
    TINY_LR,
    TINY_MAX_LENGTH,
    default_data,
    default_model,
)

from rlhf_kit.data import PackedSFTCollator, SFTCollator, hold_out, iter_jsonl, load_comparisons, tokenize_sft
from rlhf_kit.data.formats import sft_item_from_record
from rlhf_kit.models.fp8 import convert_to_fp8_backward
from rlhf_kit.models.loading import quiet_weight_progress_bars
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
from rlhf_kit.training.dist import all_reduce_sum, end_process_group, env_world_size
from rlhf_kit.training.evaluation import count_label_tokens, evaluate_lm, lm_loss
from rlhf_kit.training.guard import NonFiniteGuard
from rlhf_kit.training.hf import (
    LoraSettings,
    load_for_training,
    make_accelerator,
    save_hf_model,
)
from rlhf_kit.training.metrics import Averager, check_report_to
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
    """Supervised fine-tuning of a causal LM with the loss on response tokens only."""

    model: str | None = None
    """HF model directory or hub id. Unset: a random-init tiny llama and BPE tokenizer are built under
    <output-dir>/tiny_causal_lm (embedded default)."""
    train_data: Path | None = None
    """Training file (see --data-format). Unset: the chosen dialogues of the shipped HH sample."""
    val_data: Path | None = None
    """Validation file. Unset: --val-size examples are held out of the training data."""
    test_data: Path | None = None
    """Test file, evaluated once after training. Unset with default data: the HH test split."""
    data_format: Literal["comparisons", "text"] = "comparisons"
    """comparisons: train on the chosen side of comparison files. text: {"text"}, {"prompt","response"}
    or {"messages"} records."""
    response_marker: str = "Assistant:"
    """Plain texts are split after the last occurrence of this: the loss covers what follows. Empty: the
    whole text is the response."""
    val_size: int = 128
    """Examples held out of the training data for validation when --val-data is not given."""
    output_dir: Path = Path("outputs/sft")
    """Where metrics.jsonl, checkpoints/ and final/ are written."""
    max_length: int | None = None
    """Longest example in tokens. Unset: 256 for the embedded default, else 1024."""
    too_long: Literal["drop", "truncate"] = "truncate"
    """Examples over --max-length are truncated (keeping the start) or dropped; counted and reported."""
    packing: bool = False
    """Concatenate each micro-batch into one padding-free row (position ids restart per example); on CUDA
    in bf16/fp16 it runs under variable-length flash attention (rlhf_kit.models.varlen), elsewhere under
    the block-diagonal mask transformers derives from the position ids."""
    micro_batch_tokens: int | None = None
    """Padded tokens per micro-batch (examples x the longest): a step's examples, longest first, are cut
    into micro-batches that fit (every rank runs as many as the rank that needs most), so short examples
    go many at a time. Unset: --micro-batch-size x --max-length (never larger than the fixed micro-batch
    at full length). 0: fixed micro-batches of --micro-batch-size."""


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
    check_non_negative(micro_batch_tokens=cfg.micro_batch_tokens)
    if cfg.micro_batch_tokens != 0:  # a token budget cuts each rank's share; only whole examples per rank
        return resolve_batch_sizes(cfg.global_batch_size, 1, env_world_size())
    return resolve_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, env_world_size())


def load_items(path: Path, data_format: str) -> list:
    """SFT items of a file: chosen texts of comparisons, or text / prompt+response / messages records."""
    if data_format == "comparisons":
        return [chosen for chosen, _ in load_comparisons(path)]
    items: list = []
    for lineno, rec in iter_jsonl(path):  # empty texts, unknown chat roles: one line naming the line
        items.append(sft_item_from_record(rec, f"{path}:{lineno}"))
    if not items:
        raise ValueError(f"{path}: empty file (no records)")
    return items


def load_data(cfg: Config, tokenizer) -> tuple[list, list, list | None]:
    """Tokenised (train, validation, test) examples; validation held out of train if not given."""
    marker = cfg.response_marker or None

    def tokenize(path):
        return tokenize_sft(
            load_items(path, cfg.data_format), tokenizer, cfg.max_length, cfg.too_long, marker
        )[0]

    train = tokenize(cfg.train_data)
    if cfg.val_data is not None:
        val = tokenize(cfg.val_data)
    else:
        if len(train) <= cfg.val_size:
            raise ValueError(
                f"{cfg.train_data}: {len(train)} usable examples, too few to hold out --val-size {cfg.val_size}"
            )
        train, val = hold_out(train, cfg.val_size, cfg.seed)
    test = tokenize(cfg.test_data) if cfg.test_data is not None else None
    return train, val, test


def main(cfg: Config) -> None:
    prog = "sft.py"
    with one_line_errors(prog):
        check_config(cfg)  # also checks that the global batch divides (micro_batches splits it)
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
            cfg.model = default_model(cfg.output_dir, "causal_lm", cfg.seed)
        if cfg.train_data is None:
            files = default_data(cfg.output_dir)
            cfg.train_data, cfg.data_format = Path(files["train_comparisons"]), "comparisons"
            cfg.test_data = cfg.test_data or Path(files["test_comparisons"])
        from rlhf_kit.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, padding_side="right")  # pads with EOS if it has no pad token
        cfg.max_length = cfg.max_length or (TINY_MAX_LENGTH if tiny else PRETRAINED_MAX_LENGTH)
        if cfg.micro_batch_tokens is None:  # the fixed micro-batch's worst case, shorter examples packed in
            cfg.micro_batch_tokens = cfg.micro_batch_size * cfg.max_length
        train, val, test = load_data(cfg, tokenizer)
        lr = cfg.lr or (TINY_LR if tiny else PRETRAINED_LR)
        plan = BatchPlan(len(train), cfg.global_batch_size, cfg.seed)
        total = cfg.max_steps or max(1, math.floor(cfg.epochs * plan.steps_per_epoch))
        profiler = StepProfiler(cfg.profile_steps, cfg.output_dir / "profile", accelerator.is_main_process)

    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    model = load_for_training(cfg.model, "causal_lm", lora, cfg.gradient_checkpointing)
    convert_to_fp8_backward(model, cfg.fp8_backward)  # FP8 backward products (--fp8-backward; off: nothing)
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
    collate = PackedSFTCollator() if cfg.packing else SFTCollator(tokenizer.pad_token_id)
    eval_collate = SFTCollator(tokenizer.pad_token_id)

    def validate(split: str, examples: list, at: int) -> dict[str, float]:
        metrics = evaluate_lm(model, examples, eval_collate, cfg.eval_batch_size, device)
        logger.log({f"{split}/{k}": v for k, v in metrics.items()}, at)
        return metrics

    lengths = [len(e["input_ids"]) for e in train]
    last = min(total, cfg.stop_at_step or total)
    bar = progress(total=total, initial=step, desc="sft")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    model.train()
    while step < last:
        profiler.begin(step + 1)  # --profile-steps: this step under torch.profiler
        started = time.perf_counter()
        avg = Averager()
        micro = step_micro_batches(  # under the padded-token budget (0: fixed micro-batches)
            plan, step, rank, world, micro_batch_size=cfg.micro_batch_size, budget=cfg.micro_batch_tokens,
            costs=lengths,
        )  # fmt: skip
        batches = [collate([train[j] for j in idx]) for idx in micro]
        # Every micro-batch is divided by the global token count: accumulation == one big batch.
        tokens = all_reduce_sum([sum(count_label_tokens(b["labels"]) for b in batches)], device)[0]
        loss_sum = 0.0  # a device tensor after the first micro-batch: read once per step, in avg.reduce
        for batch in accumulate(accelerator, model, batches):  # host batches: lm_loss moves them
            loss = lm_loss(model, batch, max(tokens, 1.0) / world, "auto", device=device)
            accelerator.backward(loss)
            loss_sum = loss_sum + loss.detach()
        avg.add("loss", loss_sum)
        update = optimizer_step(accelerator, model, optimizer, scheduler, cfg.max_grad_norm, guard)
        profiler.end()
        step += 1
        logs = {f"train/{k}": v for k, v in avg.reduce(device).items()}
        logs.update({f"train/{k}": v for k, v in update.items()})
        logs.update({"train/tokens": tokens, "train/epoch": step / plan.steps_per_epoch})
        logs["time/step_s"] = time.perf_counter() - started  # after avg.reduce's read: the step has run
        logs["throughput/tokens_per_s"] = tokens / logs["time/step_s"]  # label tokens, all ranks
        logs.update(guard.end_step(step, logs, device))  # NaN/inf: skipped, counted, limited
        logger.log(logs, step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
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

    results = {"val": validate("val", val, step)}
    if test is not None:
        results["test"] = validate("test", test, step)
    save_hf_model(model, cfg.output_dir / "final", tokenizer)
    write_model_card(cfg.output_dir / "final", "sft", asdict(cfg), results)  # final/README.md
    if accelerator.is_main_process:
        write_json(cfg.output_dir / "eval_results.json", results)
        print_summary("sft", run_outputs(cfg.output_dir, eval_results="eval_results.json"), results)
    logger.close()
    model = None  # its DDP reducer holds the process group, which must end first (end_process_group)
    end_process_group(accelerator)


if __name__ == "__main__":
    from rlhf_kit.errors import RunError

    # a full disk, a run that keeps producing NaN: one line, not a traceback
    with one_line_errors("sft.py", RunError):
        main(tyro.cli(Config))
