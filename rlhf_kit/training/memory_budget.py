"""The update's micro-batch token budget, grown to what the device's memory holds: measured, not guessed.

Below the largest micro-batch that fits, a small model's training passes are bound by kernel launches:
on bench config A the PPO train phase took 0.345 s in micro-batches of 16 and 0.115 s in one of 64
(docs/benchmarks.md). Which size fits depends on the model, the optimizer, the kept generation cache and
whatever else holds the device, so a rule of thumb from the model's config is either wasteful or an
out-of-memory error. :class:`MemoryBudget` measures instead. In the second update (after the first
optimizer step has made the optimizers' state, so every long-lived tensor exists), it watches one micro-batch's
forward and backward passes: the peak of allocated memory above what was allocated before, less the
gradients that appeared, is that micro-batch's working memory; per padded token, it prices the largest
micro-batch that stays under ``fraction`` of the device (or of what is free, if less). The budget only
grows (the configured micro-batch already ran), at most to ``max_tokens`` (a whole mini-batch), and on
several ranks it is the smallest rank's, so every rank cuts alike.

The accumulated gradient does not depend on how a mini-batch is cut (token-weighted accumulation,
:func:`rlhf_kit.ppo.ppo_update`), so a larger budget changes float rounding only. The budget is part of a
run's state: :meth:`MemoryBudget.state_dict` goes into the checkpoint, so a resumed run cuts its
micro-batches as the uninterrupted one does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class MemoryProbe:
    """The device's memory counters, in bytes (:func:`cuda_probe`; tests pass their own)."""

    allocated: Callable[[], int]
    """Bytes held by tensors now."""
    peak: Callable[[], int]
    """Most bytes held since the last ``reset_peak()``."""
    reset_peak: Callable[[], None]
    capacity: Callable[[float], int]
    """Bytes this process may fill at ``fraction`` of the device: ``fraction`` of its total memory, or
    what this process holds plus what is free, whichever is less (other processes keep theirs)."""


#: CUDA device index -> (allocated, reserved) peaks before a probe reset PyTorch's peak counters.
_PEAKS_BEFORE: dict[int, tuple[int, int]] = {}


def peak_memory(device: torch.device | str | int | None = None) -> tuple[int, int]:
    """The process's peak (allocated, reserved) bytes on a CUDA device, over its whole life: PyTorch's
    counters, or what they held before :func:`cuda_probe` reset them if that was more."""
    index = _cuda_index(device)
    now = torch.cuda.max_memory_allocated(index), torch.cuda.max_memory_reserved(index)
    before = _PEAKS_BEFORE.get(index, (0, 0))
    return max(now[0], before[0]), max(now[1], before[1])


def forget_peaks() -> None:
    """Drop the peaks kept from probe resets (after resetting PyTorch's own counters on purpose)."""
    _PEAKS_BEFORE.clear()


def _cuda_index(device: torch.device | str | int | None) -> int:
    if isinstance(device, int):
        return device
    index = None if device is None else torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def cuda_probe(device: torch.device | str) -> MemoryProbe:
    """:class:`MemoryProbe` of one CUDA device (PyTorch's caching-allocator counters). Its ``reset_peak``
    keeps the peaks so far for :func:`peak_memory`, so a run's logged peak still covers its whole life."""
    device = torch.device(device)
    index = _cuda_index(device)

    def capacity(fraction: float) -> int:
        free, total = torch.cuda.mem_get_info(device)
        return int(min(fraction * total, free + torch.cuda.memory_reserved(device)))

    def reset_peak() -> None:
        _PEAKS_BEFORE[index] = peak_memory(index)
        torch.cuda.reset_peak_memory_stats(device)

    return MemoryProbe(
        allocated=lambda: torch.cuda.memory_allocated(device),
        peak=lambda: torch.cuda.max_memory_allocated(device),
        reset_peak=reset_peak,
        capacity=capacity,
    )


def _grad_bytes(params: Iterable[nn.Parameter]) -> int:
    """Bytes of the gradients held on this device (an FSDP2 DTensor gradient: this rank's shard)."""
    total = 0
    for p in params:
        g = p.grad
        if g is not None:
            g = g.to_local() if hasattr(g, "to_local") else g
            total += g.numel() * g.element_size()
    return total


class MemoryBudget:
    """The update's token budget per micro-batch, raised once from a measured micro-batch (module docstring).

    Args:
        tokens: the configured budget (padded tokens per micro-batch, > 0); never lowered.
        fraction: share of the device's memory the update may fill, in (0, 1); 0 keeps ``tokens``.
        max_tokens: no budget above this (a whole mini-batch at full length: larger changes nothing).
        probe: the device's counters (:func:`cuda_probe`); None (a CPU run) keeps ``tokens``.
    """

    def __init__(self, tokens: int, fraction: float, max_tokens: int, probe: MemoryProbe | None = None):
        if tokens < 1:
            raise ValueError(f"MemoryBudget: tokens must be positive, got {tokens}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"MemoryBudget: fraction must be in [0, 1), got {fraction}")
        self.tokens = tokens
        self.fraction = fraction
        self.max_tokens = max(max_tokens, tokens)
        self.probe = probe
        self.measured = False
        self.updates = 0
        """Updates finished (:meth:`update_done`); the first one makes the optimizers' state."""
        self.bytes_per_token = 0.0
        """What the measured micro-batch took per padded token (0 before the measurement)."""

    def wants_measurement(self) -> bool:
        """True while unmeasured, with a probe, after the first update (whose optimizer step made the
        optimizers' state: the memory around the measured micro-batch is then what every update has)."""
        if self.measured or self.probe is None or self.fraction <= 0 or self.tokens >= self.max_tokens:
            return False
        return self.updates >= 1

    def update_done(self) -> None:
        self.updates += 1

    @contextlib.contextmanager
    def measure(self, micro_tokens: int, params: list[nn.Parameter]) -> Iterator[None]:
        """Watch the forward and backward passes of one micro-batch of ``micro_tokens`` padded tokens that
        trains ``params``; on exit raise :attr:`tokens` to what the device holds (smallest over ranks)."""
        probe = self.probe
        assert probe is not None
        base, grads_before = probe.allocated(), _grad_bytes(params)
        probe.reset_peak()
        yield
        grads_after = _grad_bytes(params)
        working = max(probe.peak() - base - (grads_after - grads_before), 1)
        self.bytes_per_token = working / max(micro_tokens, 1)
        room = probe.capacity(self.fraction) - (base - grads_before) - grads_after
        fits = int(room / self.bytes_per_token) if room > 0 else 0
        if dist.is_available() and dist.is_initialized():  # every rank cuts its micro-batches alike
            t = torch.tensor(float(fits), dtype=torch.float64, device=_collective_device())
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            fits = int(t.item())
        self.tokens = min(max(self.tokens, fits), self.max_tokens)
        self.measured = True

    def state_dict(self) -> dict:
        keys = ("tokens", "measured", "updates", "bytes_per_token")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.measured = int(state["tokens"]), bool(state["measured"])
        self.updates, self.bytes_per_token = int(state["updates"]), float(state["bytes_per_token"])


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
