"""Run a test body on several CPU processes (a gloo group), collecting each rank's traceback."""

from __future__ import annotations

import faulthandler
import os
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run_rank(body: Callable[[int], None], rank: int, store: str, world: int, errors) -> None:
    faulthandler.enable()  # a rank killed by a signal (a C++ abort) prints its Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        body(rank)
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # A finished rank leaves without the interpreter's teardown: there, under load, gloo's threads have
    # aborted ranks whose body had passed ("terminate called without an active exception", SIGABRT with
    # no Python frame left on the stack), failing a test that had passed.
    os._exit(0)


def spawn_ranks(body: Callable[[int], None], store: str, world: int = 2, timeout: float = 120) -> None:
    """Run ``body(rank)`` on ``world`` spawned processes inside one gloo group (``file://{store}``).

    ``body`` must be a module-level function (it is pickled by reference). A failing rank's traceback
    fails the calling test.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=_run_rank, args=(body, r, store, world, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), "\n".join(msgs) or [p.exitcode for p in procs]
