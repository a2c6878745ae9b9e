"""Run a test worker on several CPU processes (gloo), collecting each rank's traceback."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.multiprocessing as mp


def spawn_ranks(worker: Callable, store: str, world: int = 2, timeout: float = 120) -> None:
    """Start ``worker(rank, store, errors)`` on ``world`` spawned processes and wait for them.

    The worker initialises its process group from ``file://{store}`` and puts a traceback on ``errors``
    when it fails; a non-zero exit of any rank fails the calling test with those tracebacks.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=worker, args=(r, store, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), "\n".join(msgs) or [p.exitcode for p in procs]
