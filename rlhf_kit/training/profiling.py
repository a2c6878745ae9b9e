"""``--profile-steps``: chosen optimizer steps under ``torch.profiler``, written beside the run.

For each profiled step ``n`` the main process writes, under ``<output-dir>/profile/``:

- ``step_<n>.trace.json``: the Chrome / Perfetto trace (open it in ``chrome://tracing`` or
  https://ui.perfetto.dev);
- ``step_<n>.txt``: the op table (``key_averages``), sorted by device time on a GPU, else CPU time;
- ``step_<n>.json``: a summary: wall seconds, device-kernel seconds, ``device_busy`` (kernel time /
  wall: well under 1 means the step waits on the host, launches or syncs) and the top ops.

Profiling adds host overhead (a few percent, more with many tiny ops), so a profiled step's
``time/step_s`` is not a speed number: read the split, not the total.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence

import torch

from rlhf_kit.training.atomic import write_file

TOP_OPS = 25


class StepProfiler:
    """Profile the optimizer steps in ``steps`` (1-based, as logged); every other step runs untouched.

    ``out_dir`` is created on first use; ``enabled=False`` (non-main ranks) makes every step plain.
    """

    def __init__(self, steps: Sequence[int], out_dir: str | os.PathLike, enabled: bool = True):
        bad = [s for s in steps if s < 1]
        if bad:
            raise ValueError(f"--profile-steps: steps are 1-based optimizer steps, got {bad}")
        self.steps = frozenset(steps) if enabled else frozenset()
        self.out_dir = os.fspath(out_dir)
        self._active: tuple | None = None

    def begin(self, n: int) -> None:
        """Start optimizer step ``n``: under the profiler when ``n`` was asked for (then :meth:`end` it)."""
        self._active = None
        if n not in self.steps:
            return
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = profile(activities=activities, record_shapes=False)
        prof.start()
        self._active = (n, prof, time.perf_counter(), cuda)

    def end(self) -> None:
        """End the step :meth:`begin` started; writes its files when it was profiled."""
        if self._active is None:
            return
        n, prof, started, cuda = self._active
        self._active = None
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        prof.stop()
        self._write(n, prof, wall, cuda)

    @contextlib.contextmanager
    def step(self, n: int) -> Iterator[None]:
        """The body of optimizer step ``n`` between :meth:`begin` and :meth:`end`."""
        self.begin(n)
        yield
        self.end()

    def _write(self, n: int, prof, wall: float, cuda: bool) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        base = os.path.join(self.out_dir, f"step_{n}")
        tmp = f"{base}.trace.json.{os.getpid()}.tmp"  # atomic, as every file of a run
        prof.export_chrome_trace(tmp)
        os.replace(tmp, base + ".trace.json")
        averages = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        write_file(base + ".txt", averages.table(sort_by=sort, row_limit=TOP_OPS * 2))
        summary = step_summary(averages, wall, key)
        write_file(base + ".json", json.dumps(summary, indent=2) + "\n")


def step_summary(averages, wall: float, key: str) -> dict:
    """Wall time, summed self time of ``key`` (device kernels or CPU ops, microseconds in ``averages``),
    their ratio and the ``TOP_OPS`` ops by that time. ``averages``: ``prof.key_averages()``."""
    rows = [(e.key, getattr(e, key, 0.0) or 0.0, e.count) for e in averages]
    total_us = sum(t for _, t, _ in rows)
    rows.sort(key=lambda r: -r[1])
    return {
        "wall_s": wall,
        "busy_s": total_us / 1e6,
        "device_busy" if key.startswith("self_device") else "cpu_busy": total_us / 1e6 / wall
        if wall
        else None,
        "ops": len(rows),
        "calls": sum(c for _, _, c in rows),
        "top": [{"op": k, "s": t / 1e6, "calls": c} for k, t, c in rows[:TOP_OPS]],
    }
