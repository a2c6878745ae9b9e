"""Move idle models and optimizer state to CPU (pinned memory) and back, to free accelerator memory.

PPO keeps four models; while the actor generates, the critic, reference, reward model and the
optimizer states can sit in host memory. Pinned host memory makes the copies back asynchronous-capable
and fast; pinning is only done when CUDA is available. On a CPU-only run every call is a cheap no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rlhf_kit.training.fsdp import is_sharded


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    if type(t) is not torch.Tensor:  # a subclass (torchao's 8-bit AdamW state): copying into a plain
        return t.to("cpu")  # tensor would de-quantise it; ``.to`` keeps the codes (unpinned)
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=False)
    return host


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.is_pinned())


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _move_module(model: nn.Module, move) -> nn.Module:
    for module in model.modules():
        for p in module.parameters(recurse=False):
            local = _local(p)
            local.data = move(local.data)
            if p.grad is not None:
                g = _local(p.grad)
                g.data = move(g.data)
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                module._buffers[name] = move(b)
    return model


def offload_model(model: nn.Module) -> nn.Module:
    """Move parameters, gradients and buffers to CPU (pinned when CUDA exists), in place; returns ``model``.

    Parameter objects are kept (only ``.data`` moves), so optimizers holding them stay valid. FSDP2
    models move their local shards through ``module.to`` (which FSDP2 re-registers correctly).
    """
    if is_sharded(model):
        return model.to("cpu")
    return _move_module(model, _to_host)


def onload_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move a model offloaded by :func:`offload_model` back to ``device`` in place."""
    device = torch.device(device)
    if is_sharded(model):
        return model.to(device)
    return _move_module(model, lambda t: _to_device(t, device))


def _move_optimizer(opt: torch.optim.Optimizer, move) -> torch.optim.Optimizer:
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                local = _local(v)
                if local is v:
                    state[k] = move(v)
                else:
                    local.data = move(local.data)
    return opt


def offload_optimizer_state(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Move optimizer state tensors (AdamW ``exp_avg``, ``exp_avg_sq``) to CPU; the ``step`` counters stay."""
    return _move_optimizer(opt, _to_host)


def onload_optimizer_state(opt: torch.optim.Optimizer, device: torch.device | str) -> torch.optim.Optimizer:
    """Move optimizer state back to ``device`` (call before ``opt.step()``)."""
    device = torch.device(device)
    return _move_optimizer(opt, lambda t: _to_device(t, device))


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model with no parameters)."""
    for p in model.parameters():
        return _local(p).device
    return torch.device("cpu")


@contextmanager
def offloaded(*models: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Keep ``models`` on CPU inside the block and bring them back to ``device`` on exit.

    >>> with offloaded(critic, ref_model, device="cuda"):
    ...     rollouts = generate(actor, prompts)
    """
    for m in models:
        offload_model(m)
    try:
        yield
    finally:
        for m in models:
            onload_model(m, device)
