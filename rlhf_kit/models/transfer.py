"""Host values onto the device without waiting for it.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, and such a copy synchronises:
the host waits until every kernel queued before it has run, so the GPU then idles while the host queues
the next ones. On a small model whose passes are launch-bound that costs more than the copy itself, once
per micro-batch. :func:`host_tensor` stages the values in pinned memory and copies asynchronously on the
current stream instead; torch's pinned-memory allocator keeps the staging block until that copy is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def host_tensor(
    values: Sequence[int] | Sequence[float] | torch.Tensor,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``values`` (a host list, or a CPU tensor) as a tensor on ``device``: on CUDA an asynchronous copy
    from pinned memory (no device synchronisation); elsewhere the plain tensor."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":  # already on a device: an ordinary copy
            return values.to(device=device, dtype=dtype)
        cpu = values if dtype is None else values.to(dtype)
    else:
        cpu = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return cpu.to(device)
    return cpu.pin_memory().to(device, non_blocking=True)


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collator's batch on ``device``: every CPU tensor through :func:`host_tensor` (on CUDA an
    asynchronous copy from pinned memory, so moving a micro-batch does not wait for the previous one's
    backward); other values as they are."""
    return {k: host_tensor(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
