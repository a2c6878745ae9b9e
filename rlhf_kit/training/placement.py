"""Put models on the device for training: compile, FSDP2 sharding or accelerate, optimizers, schedules.

One call that the PPO recipe (and a user's own loop) makes after loading its models:

* ``fp8_backward``: FP8 backward products in the trainable models' linear layers (:mod:`rlhf_kit.models.fp8`);
* ``compile_blocks``: regional ``torch.compile`` of every model (:mod:`rlhf_kit.models.compile`);
* several processes with ``fsdp``: every model, frozen ones included, sharded with torch's
  ``fully_shard`` (bf16 compute weights under bf16 mixed precision, fp32 master weights and gradient
  reduction); accelerate's FSDP2 ``prepare`` takes one model only, so it is not used for this;
* otherwise the trainable models go to the device first (fused AdamW on GPU) and through
  ``accelerator.prepare`` (DDP when several processes run);
* per trainable model an AdamW (no decay on biases/norms; with ``master_weights`` bf16 weights and fp32
  masters, :mod:`rlhf_kit.training.precision`; or 8-bit over bf16 weights, :mod:`rlhf_kit.training.lowbit`)
  and a warm-up + cosine schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_kit.training.optim import clip_grad_norm, cosine_schedule
from rlhf_kit.training.precision import make_optimizer


@dataclass
class OptimSettings:
    """AdamW and schedule of one trainable model."""

    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class PlacedModels:
    """Trainable models (as prepared), their optimizers and schedulers by name, ready for
    :func:`rlhf_kit.training.checkpoint.save_checkpoint`; ``backward(loss)`` and
    ``clip_grad(module, max_norm) -> float`` to hand to :func:`rlhf_kit.ppo.ppo_update`."""

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    backward: Callable[[torch.Tensor], None]
    clip_grad: Callable[[nn.Module, float], float]
    sharded: bool = False
    """Whether the models were sharded with FSDP2 (generation through them is then collective)."""


def place_models(
    accelerator,
    trainable: dict[str, tuple[nn.Module, OptimSettings]],
    frozen: list[nn.Module | None] = (),
    *,
    warmup_steps: int,
    total_steps: int,
    fsdp: bool = False,
    master_weights: bool = False,
    optimizer: str = "adamw",
    compile_blocks: bool = False,
    compile_kwargs: dict | None = None,
    fp8_backward: str = "off",
) -> PlacedModels:
    """Compile, shard or prepare ``trainable`` (name -> (model, settings)) and ``frozen`` models.

    ``fsdp`` shards only when ``accelerator.num_processes > 1`` (or accelerate was launched with an
    FSDP config). ``master_weights`` needs a single process (:mod:`rlhf_kit.training.precision`);
    ``optimizer="adamw8bit"`` (bf16 weights, 8-bit moments: :mod:`rlhf_kit.training.lowbit`) does not shard.
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``{"backend": "aot_eager"}`` without a compiler).
    ``fp8_backward`` (``"weights"`` or ``"all"``) runs the trainable models' backward products in FP8
    (:mod:`rlhf_kit.models.fp8`; bf16 weights: ``master_weights`` or ``adamw8bit``).
    Frozen models are compiled and sharded with the others; placing them on the device is the caller's.
    """
    from accelerate import DistributedType

    frozen = [m for m in frozen if m is not None]
    device = accelerator.device
    shard = accelerator.num_processes > 1 and (fsdp or accelerator.distributed_type == DistributedType.FSDP)
    if master_weights and accelerator.num_processes > 1:
        raise ValueError("master_weights is for one process; with several, FSDP2 keeps the fp32 masters")
    if optimizer == "adamw8bit" and shard:
        raise ValueError("optimizer adamw8bit is not built for FSDP2 sharding: one process or DDP")
    if fp8_backward != "off":  # before compiling: the blocks are traced with their FP8 layers
        from rlhf_kit.models.fp8 import convert_to_fp8_backward

        for m, _ in trainable.values():
            convert_to_fp8_backward(m, fp8_backward)
    if compile_blocks:
        from rlhf_kit.models.compile import compile_blocks as compile_model_blocks
        from rlhf_kit.models.compile import dependent_launch

        kwargs = dependent_launch(accelerator.device, compile_kwargs or {})  # PDL on Hopper and later
        for m in [m for m, _ in trainable.values()] + frozen:
            compile_model_blocks(m, **kwargs)
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from rlhf_kit.training.fsdp import apply_fsdp2

        bf16 = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        policy = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32)
        for m in [m.to(device) for m, _ in trainable.values()] + frozen:
            apply_fsdp2(m, mixed_precision=policy)  # before the optimizers: it replaces the parameters
    else:
        for m, _ in trainable.values():
            m.to(device)
    models, optimizers, schedulers = {}, {}, {}
    for name, (m, s) in trainable.items():
        models[name] = m
        optimizers[name] = make_optimizer(
            m, s.lr, s.weight_decay, s.betas, kind=optimizer, master_weights=master_weights
        )
        schedulers[name] = cosine_schedule(optimizers[name], warmup_steps, total_steps, s.min_lr)
    if shard:
        backward, clip = (lambda loss: loss.backward()), clip_grad_norm
    else:
        names = list(models)
        prepared = accelerator.prepare(*[models[n] for n in names], *[optimizers[n] for n in names])
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        models = dict(zip(names, prepared[: len(names)]))
        optimizers = dict(zip(names, prepared[len(names) :]))
        backward = accelerator.backward

        def clip(module: nn.Module, max_norm: float) -> float:
            return float(accelerator.clip_grad_norm_(module.parameters(), max_norm))

    return PlacedModels(models, optimizers, schedulers, backward, clip, shard)
