"""Process-group helpers that also work in a plain single-process run (no process group).

Every recipe calls these instead of ``torch.distributed`` directly so that ``python recipe.py`` and
``accelerate launch recipe.py`` share one code path.
"""

from __future__ import annotations

import gc
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def local_rank() -> int:
    """Rank on this host, from ``LOCAL_RANK`` (set by torchrun/accelerate), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on global rank 0: the process that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op without a process group."""
    if is_dist():
        dist.barrier()


def seed_everything(seed: int, rank_offset: bool = True) -> int:
    """Seed python, numpy and torch (CPU and CUDA); returns the seed actually used.

    With ``rank_offset`` each rank gets ``seed + rank`` so that per-rank sampling (dropout, rollout
    sampling) differs across ranks while staying reproducible.
    """
    s = seed + (rank() if rank_offset else 0)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)
    return s


def env_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE``), readable before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """Global rank: the process group's if there is one, else the launcher's ``RANK`` (0 if unset)."""
    return rank() if is_dist() else int(os.environ.get("RANK", "0"))


def gather_objects(obj: object) -> list:
    """``[obj_rank0, obj_rank1, ...]`` (picklable objects) on every rank; ``[obj]`` without a process group."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of a list of floats over ranks (identity without a process group)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def end_process_group(accelerator: Any = None) -> None:
    """End the run's process group once every collective is done and nothing else owns it.

    ``destroy_process_group`` must be what frees torch's gloo group. A DDP-wrapped model still alive
    after it (a recipe's ``model`` until ``main`` returns) owns the group through its reducer, and
    freeing the model then joins gloo's worker threads with the GIL held: a worker still finishing its
    last collective needs the GIL (a hang) or is not joined (``terminate called without an active
    exception``). Callers drop their own reference to the wrapped model first. This drops the
    accelerator's references (``free_memory``), collects, waits at a barrier and then ends the group
    (``end_training``, which also closes accelerate's trackers, when an accelerator is given). A no-op
    without a process group.
    """
    if accelerator is not None:
        accelerator.free_memory()
    gc.collect()
    if is_dist():
        dist.barrier()
    if accelerator is not None:
        accelerator.end_training()
    elif is_dist():
        dist.destroy_process_group()
