"""Optimisation and run fields shared by the recipes' configs (SFT, reward model, PPO).

Plain dataclasses whose field docstrings are the command-line help: a recipe's tyro config inherits
them (``class Config(SupervisedOptions)``), so each flag is defined and documented once. A recipe that
needs another default redeclares the field with its own docstring; tyro lists inherited fields first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_kit.errors import ConfigError
from rlhf_kit.training.hf import MixedPrecision


@dataclass
class TrainingOptions:
    """Batch sizes, AdamW, LoRA and run bookkeeping: the fields of every training recipe."""

    global_batch_size: int = 32
    """Samples per optimizer step over all processes (= micro batch x accumulation steps x world size);
    a sample is an SFT example, a comparison pair or a PPO rollout sample."""
    micro_batch_size: int = 8
    """Samples per forward/backward pass on each process (1-16 usual; lower it when out of memory:
    gradient accumulation keeps the global batch)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up, in optimizer steps (capped at the total; NeMo-Aligner 10)."""
    weight_decay: float = 0.0
    """AdamW weight decay, 0-0.1 usual (never applied to biases and norms)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this (1.0 usual, as NeMo-Aligner and TRL; 0 disables clipping;
    the norm is still logged)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    master_weights: bool = False
    """bf16 model weights with fp32 master weights in AdamW (one process; faster, less memory than
    fp32 weights under autocast). --mixed-precision auto picks it on one bf16 GPU without FSDP or LoRA."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw: torch's AdamW (fused on CUDA; fp32 moments). adamw8bit: 8-bit block-wise AdamW moments over bf16
    weights with stochastic rounding (torchao's quantisation, one fused update per chunk of parameters),
    6 bytes per trained parameter instead of 16-18 (for models whose optimizer state does not fit; all
    weights trained, no FSDP; pip install 'rlhf-kit[lowbit]')."""
    fp8_backward: Literal["off", "weights", "all"] = "off"
    """FP8 (e4m3) products in the backward pass of the trained models' linear layers, the forward pass (and so
    every log-prob and score) unchanged bit for bit (rlhf_kit.models.fp8). weights: weight gradients only,
    a third of a training pass's products, gradients about as close to fp32 as bf16's; all: input gradients
    too, two thirds, about 2.5x bf16's gradient error. Needs bf16 trained weights (--master-weights, which
    --mixed-precision auto picks on one GPU, or --optimizer adamw8bit), no LoRA, a GPU of compute capability
    8.9+ (H100, L4, RTX 40xx) and torchao (pip install 'rlhf-kit[lowbit]'). Its speed is not yet measured."""
    lora_r: int = 0
    """LoRA rank on the trained model (PPO: the actor), 8-64 usual; 0 trains all weights. A reward model's score head
    still trains in full; the PPO reference is then the actor with its adapters disabled; the final
    model has the adapters merged in."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale = alpha / r; usually r to 2r)."""
    keep_last: int = 2
    """Keep only this many newest checkpoints (>= 1)."""
    resume: bool = False
    """Continue from the latest checkpoint in <output-dir>/checkpoints."""
    overwrite: bool = False
    """Start again in an output directory used by an earlier run (its checkpoints and metrics go)."""
    extend_max_steps: bool = False
    """With --resume: accept a larger --max-steps / --epochs than the stored run. The schedule is rebuilt
    for the new length from the resumed step on, so the result differs from a run started with it."""
    max_bad_steps: int = 10
    """Steps with a NaN/inf loss or gradient norm (skipped, never applied) tolerated; one more stops."""
    report_to: tuple[str, ...] = ("jsonl",)
    """Metric sinks: jsonl (metrics.jsonl, always written) plus any of accelerate's trackers (wandb,
    tensorboard, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab; each needs its package).
    wandb honours WANDB_MODE=offline; tensorboard writes <output-dir>/tensorboard/."""
    run_name: str | None = None
    """Run name given to the trackers that take one (wandb, trackio, mlflow)."""
    seed: int = 0
    """Seed for initialisation, data order, validation split and sampling."""
    cudnn_attention: bool = False
    """Let PyTorch's SDPA pick cuDNN's attention kernel on CUDA. Off by default: on an H200 it spent about
    2 ms of host time per call (every layer, every micro-batch), and the RM recipe trained 1.8-2.6x
    faster on flash attention (docs/benchmarks.md)."""
    profile_steps: tuple[int, ...] = ()
    """Optimizer steps (1-based) to run under torch.profiler: a Chrome trace, an op table and a summary
    (device-busy fraction, top ops) per step in <output-dir>/profile/ (e.g. --profile-steps 5 6)."""


@dataclass
class SupervisedOptions(TrainingOptions):
    """:class:`TrainingOptions` plus the schedule, evaluation and LoRA fields of the SFT and RM recipes."""

    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass of a given --model (TRL's default too): SmolLM2-135M at
    the default token budget took 3.8 GiB of GPU memory instead of 17.7, and 0.7x the pairs/s. The
    embedded tiny default skips it. --no-gradient-checkpointing keeps the activations."""
    master_weights: bool = False
    """bf16 model weights with fp32 master weights in AdamW, and no autocast under --mixed-precision auto
    (one process; saved models are bf16). --mixed-precision auto already picks this on one bf16 GPU;
    the flag forces it elsewhere (CPU, LoRA)."""

    eval_batch_size: int = 16
    """Samples per forward pass during validation and test (no gradients: 2-4x --micro-batch-size fits)."""
    max_steps: int | None = None
    """Optimizer steps to train. Unset: --epochs passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when --max-steps is not given (fractions allowed; 1-3 usual)."""
    lr: float | None = None
    """Peak AdamW learning rate (cosine decay after warm-up). Unset: 1e-3 for the embedded tiny model,
    1e-5 for a given --model (NeMo-Aligner RM 9e-6; 1e-6 to 2e-5 usual for fine-tuning)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr x min-lr-ratio, in [0, 1] (NeMo-Aligner 0.1)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (0.9 usual)."""
    adam_beta2: float = 0.999
    """AdamW beta2 (0.999 as torch and TRL; NeMo-Aligner 0.98)."""
    lora_dropout: float = 0.0
    """Dropout probability on the LoRA input (0-0.1)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt, or "all-linear"."""
    mixed_precision: MixedPrecision = "auto"
    """auto: on one GPU with bf16, training all weights (no LoRA), bf16 weights with fp32 master weights
    in AdamW and no autocast (what --master-weights gives; the fastest measured, docs/benchmarks.md);
    otherwise the accelerate config's setting, else bf16 autocast where the GPU supports it, else fp32.
    bf16: autocast over fp32 weights. no: fp32."""
    val_check_interval: int = 50
    """Validate every this many optimizer steps, and after the last one (NeMo-Aligner RM 100)."""
    save_interval: int = 100
    """Save a resumable checkpoint every this many optimizer steps (NeMo-Aligner RM 100)."""
    stop_at_step: int | None = None
    """Stop after this step with a checkpoint, as if interrupted (time-boxed jobs; resume tests)."""
    project: str = "rlhf-kit"
    """wandb project."""


def settle_speed_defaults(opts: SupervisedOptions, *, embedded: bool, world_size: int) -> str | None:
    """Resolve the SFT/RM fast path in place: what ``--mixed-precision auto`` and checkpointing mean here.

    * ``gradient_checkpointing`` is dropped for the embedded tiny model (``embedded``): two small layers,
      nothing to save, only recompute to pay.
    * ``mixed_precision="auto"`` with one process on a bf16 GPU, all weights trained (``lora_r == 0``) and
      no launcher precision other than bf16 becomes ``master_weights=True, mixed_precision="no"``: bf16
      weights, fp32 masters, no autocast casts. LoRA is left to autocast (its frozen base stays fp32);
      several processes, or an FSDP launch, keep FSDP2's mixed-precision policy.
    * explicit ``master_weights`` under ``"auto"`` also turns autocast off (the weights are bf16 already).

    Returns a one-line note for the log when ``auto`` chose master weights, else ``None``. Runs before
    the run's settings are stored, so a resume compares the resolved values.
    """
    if embedded:
        opts.gradient_checkpointing = False
    if opts.mixed_precision != "auto":
        return None
    if opts.optimizer == "adamw8bit":  # bf16 weights already: autocast would only add casts
        opts.mixed_precision = "no"
        return None
    chosen = not opts.master_weights and auto_master_weights(world_size, opts.lora_r)
    if opts.master_weights or chosen:
        opts.master_weights, opts.mixed_precision = True, "no"
    if chosen:
        return "--mixed-precision auto: bf16 weights with fp32 master weights (--mixed-precision bf16 for autocast)"
    return None


def settle_ppo_master_weights(
    opts: TrainingOptions, mixed_precision: str, *, world_size: int, fsdp: bool
) -> str | None:
    """PPO's share of the fast path, in place: ``--mixed-precision auto`` on one bf16 GPU, without FSDP
    and with the actor trained in full, turns on ``master_weights`` (bf16 actor and critic, fp32 masters).
    Autocast stays on: the frozen reference and reward model keep fp32 weights. Returns a log note."""
    if opts.master_weights or mixed_precision != "auto" or fsdp or opts.optimizer != "adamw":
        return None
    if not auto_master_weights(world_size, opts.lora_r):
        return None
    opts.master_weights = True
    return "--mixed-precision auto: bf16 actor and critic with fp32 master weights (--mixed-precision bf16: fp32 weights)"


def resolve_compile_blocks(choice: str, opts: TrainingOptions, *, world_size: int, fsdp: bool) -> bool:
    """PPO's ``--compile-blocks auto|on|off``: auto compiles on one CUDA GPU with all weights trained, no
    FSDP and no gradient checkpointing (where compiled blocks were measured to win); CPU never gains.
    ``off`` keeps ``torch.compile`` out of the run: it turns the log-probs' compiled function off too
    (:data:`rlhf_kit.logprobs.FUSED`), which any other choice leaves to its default (on CUDA)."""
    import rlhf_kit.logprobs

    rlhf_kit.logprobs.FUSED = False if choice == "off" else None
    if choice in ("on", "off"):
        return choice == "on"
    if choice != "auto":
        raise ConfigError(f"--compile-blocks must be auto, on or off, got {choice!r}")
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if world_size != 1 or opts.lora_r or fsdp or fsdp_launch or opts.gradient_checkpointing:
        return False
    return torch.cuda.is_available()


def auto_master_weights(world_size: int, lora_r: int) -> bool:
    """Whether ``--mixed-precision auto`` means bf16 weights with fp32 masters: one process on a GPU that
    has bf16, all weights trained, no FSDP launch and no ``accelerate launch`` precision other than bf16."""
    if world_size != 1 or lora_r != 0:
        return False
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return False  # accelerate/fsdp.yaml: FSDP2's policy keeps the masters (it replaces the parameters)
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16") != "bf16":
        return False  # the launcher's config asked for fp32 or fp16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_optimizer_choice(opts: TrainingOptions, *, world_size: int, fsdp: bool = False) -> None:
    """One-line :class:`ConfigError` for an ``--optimizer`` or ``--master-weights`` that cannot run with the
    other settings (call before settling ``--mixed-precision auto``: an explicit ``--master-weights`` is what
    it sees)."""
    if opts.master_weights and (world_size > 1 or fsdp):
        raise ConfigError("--master-weights is for one process; with several, FSDP2 keeps the fp32 masters")
    if opts.optimizer != "adamw8bit":
        return
    if opts.master_weights:
        raise ConfigError(
            "--optimizer adamw8bit keeps bf16 weights and no fp32 masters: drop --master-weights"
        )
    if opts.lora_r:
        raise ConfigError("--optimizer adamw8bit trains all weights; LoRA's adapters are small (use adamw)")
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if world_size > 1 and (fsdp or fsdp_launch):
        raise ConfigError("--optimizer adamw8bit is not built for FSDP2 sharding: one process or DDP")
    from rlhf_kit.training.lowbit import torchao_quant_utils

    torchao_quant_utils()  # torchao missing: one line with the install hint, before any model is built


def check_fp8_backward(opts: TrainingOptions, device: torch.device | str | None = None) -> None:
    """One-line :class:`ConfigError` for an ``--fp8-backward`` that cannot run with the other settings, before
    any model is built; call after ``--mixed-precision auto`` is settled (it may choose the master weights).
    ``device``: the training device (default: CUDA where available, else the CPU)."""
    if opts.fp8_backward == "off":
        return
    from rlhf_kit.models.fp8 import fp8_backward_config, fp8_capable

    if opts.lora_r:
        raise ConfigError(
            "--fp8-backward converts plain linear layers; LoRA's adapters are not (drop --lora-r)"
        )
    if not (opts.master_weights or opts.optimizer == "adamw8bit"):
        raise ConfigError(
            "--fp8-backward needs bf16 trained weights: --master-weights (--mixed-precision auto picks it on one "
            "GPU) or --optimizer adamw8bit"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not fp8_capable(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ConfigError(f"--fp8-backward needs FP8 tensor cores (compute capability 8.9+); {name} has none")
    fp8_backward_config(opts.fp8_backward)  # torchao missing: the install hint
