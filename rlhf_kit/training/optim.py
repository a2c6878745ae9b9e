"""Optimizer, learning-rate schedule and gradient clipping shared by the SFT, RM and PPO recipes."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that take no weight decay: biases and norm weights.

    Norms are found by type (``nn.LayerNorm``) and by class name (``LlamaRMSNorm`` etc.), so every HF
    decoder family is covered without listing them.
    """
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name.endswith("bias"):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups for a model's trainable parameters: decayed matrices, undecayed biases/norms."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    device: torch.device | str | None = None,
) -> torch.optim.AdamW:
    """AdamW over a model (no decay on biases and norms) or over given params / param groups.

    ``fused=None`` uses the fused kernel when the parameters train on CUDA: ``device`` when given (a
    recipe builds the optimizer before ``accelerator.prepare`` moves the model there), else where every
    parameter is now.
    """
    if isinstance(params_or_model, nn.Module):
        groups: list = param_groups(params_or_model, weight_decay)
    else:
        groups = list(params_or_model)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused is None:
        fused = torch.device(device).type == "cuda" if device is not None else all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(
        groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused or None
    )


def cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR: linear warm-up over ``warmup_steps`` then cosine decay reaching ``min_lr`` at ``total_steps``.

    ``min_lr`` is absolute; each param group keeps its own base lr (a group with base lr 0 stays 0).
    """
    if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total >= 1"
        )
    lambdas = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        if min_lr > base:
            raise ValueError(f"min_lr {min_lr} is larger than the learning rate {base}")
        ratio = min_lr / base if base > 0 else 0.0
        lambdas.append(lambda s, r=ratio: cosine_lr_factor(s, warmup_steps, total_steps, r))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def clip_grad_norm(model_or_params: nn.Module | Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to ``max_norm`` (total L2 norm) and return the pre-clip norm as a float.

    Works for plain modules and FSDP2 models (DTensor params: the norm is reduced across ranks).
    ``max_norm <= 0`` only measures the norm.
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    clip_to = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip_to)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
