"""The optimizer-step pieces every recipe repeats: gradient-accumulation sync and the update itself."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

from torch import nn

from rlhf_kit.training.guard import NonFiniteGuard
from rlhf_kit.training.optim import clip_grad_norm
from rlhf_kit.training.precision import grad_holder

T = TypeVar("T")


def accumulate(accelerator: Any, model: nn.Module, micro_batches: Sequence[T]) -> Iterator[T]:
    """Yield micro-batches; gradients are synchronised across processes only for the last one (DDP).

    Run forward *and* backward inside the loop body: the no-sync context is open while it runs.
    """
    for i, mb in enumerate(micro_batches):
        ctx = accelerator.no_sync(model) if i < len(micro_batches) - 1 else nullcontext()
        with ctx:
            yield mb


def optimizer_step(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    max_grad_norm: float,
    guard: NonFiniteGuard | None = None,
) -> dict:
    """Unscale (fp16), clip, step the optimizer and the schedule, zero grads.

    With a master-weight optimizer (:mod:`rlhf_kit.training.precision`) the fp32 masters are clipped.
    A non-finite gradient norm (a NaN/inf loss in any micro-batch on any rank) skips the optimizer
    step: the weights and the optimizer state stay as they were, the schedule still advances, and
    ``guard`` (a :class:`~rlhf_kit.training.guard.NonFiniteGuard`) counts the skip.

    Returns ``{"grad_norm": pre-clip norm, "lr": learning rate used for this step}``.
    """
    accelerator.unscale_gradients()
    grad_norm = clip_grad_norm(grad_holder(model, optimizer), max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    if math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    else:
        if guard is not None:
            guard.skip_update("grad_norm", grad_norm)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": skipped on purpose
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr}
