"""Python's cyclic garbage collector, run between training steps instead of inside them.

CPython starts a collection whenever enough container objects have been allocated since the last one, at
whatever line the program is on: inside a generate call, between two kernel launches of a backward pass.
The collection walks every tracked object of its generation; after a run has built its models, compiled
graphs and optimizers, the oldest generation holds hundreds of thousands of objects, and the step that
happens to trigger its collection stalls for that long while the GPU waits for its next launch.

:class:`GarbageCollection` takes that choice away from the allocator:

- on entry it collects once, then ``gc.freeze()`` moves every object alive after setup (modules,
  parameters, compiled code) out of the collector's sight, so later collections do not walk them;
- with ``every > 0`` it turns automatic collection off and runs a full collection after every
  ``every``-th step, where the loop calls :meth:`step` (a place with no GPU work in flight to stall);
- it measures the seconds spent collecting, automatic or not, through ``gc.callbacks``: :meth:`step`
  returns them per step (logged as ``time/gc``), which shows whether collection costs anything at all;
- on exit it restores the collector as it found it (enabled or not, nothing frozen).

Megatron-LM (``--manual-gc``) and torchtitan (``training.gc_freq``) manage the collector the same way.
Cyclic garbage made during a step lives until the next collection, ``every`` steps at most.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GarbageCollection:
    """Collect garbage every ``every`` steps, between them (``0``: Python's automatic collection stays on).

    ``freeze=False`` leaves the setup's objects in the collector's sight: with ``every=0`` that is Python's
    own behaviour, measured (a baseline for benchmarks).

    >>> with GarbageCollection(every=50) as collector:
    ...     for step in range(1, 101):
    ...         ...  # one training step
    ...         seconds = collector.step()  # collects after steps 50 and 100; seconds in gc this step
    """

    def __init__(self, every: int = 0, freeze: bool = True) -> None:
        if every < 0:
            raise ValueError(
                f"GarbageCollection(every={every}): the interval must be 0 (automatic) or positive"
            )
        self.every = int(every)
        self.freeze = freeze
        self.steps = 0
        self.collections = 0  # collections seen, automatic or managed, since entry
        self._seconds = 0.0  # spent collecting since the last step()
        self._started: float | None = None
        self._was_enabled = True
        self._active = False

    def _measure(self, phase: str, info: dict[str, Any]) -> None:  # gc.callbacks: around every collection
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None
            self.collections += 1

    def __enter__(self) -> GarbageCollection:
        self._was_enabled = gc.isenabled()
        gc.collect()  # the setup's garbage, before the survivors are frozen
        if self.freeze:
            gc.freeze()
        if self.every:
            gc.disable()
        gc.callbacks.append(self._measure)
        self._active = True
        return self

    def step(self) -> float:
        """End one step: a full collection when this is an ``every``-th step. Returns the seconds spent
        collecting since the previous call (automatic collections included), this one's too."""
        self.steps += 1
        if self._active and self.every and self.steps % self.every == 0:
            gc.collect()
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def __exit__(self, *exc: object) -> None:
        if not self._active:
            return
        self._active = False
        gc.callbacks.remove(self._measure)
        if self.freeze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        else:
            gc.disable()
