import gc
import weakref

import pytest

from rlhf_kit.training.gc_control import GarbageCollection


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def cycle() -> weakref.ref:
    return weakref.ref(Node())


@pytest.fixture(autouse=True)
def _restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if was else gc.disable()


def test_managed_collects_cycles_only_at_the_interval():
    with GarbageCollection(every=3) as collector:
        assert not gc.isenabled()
        ref = cycle()
        alive = [[] for _ in range(100_000)]  # far past the automatic threshold: nothing collects on its own
        collector.step()
        collector.step()
        assert ref() is not None  # steps 1 and 2: no collection
        collector.step()
        assert ref() is None  # step 3 collected the cycle
        del alive
        assert collector.collections >= 1


def test_entry_freezes_setup_objects_and_exit_restores_the_collector():
    keep = [Node() for _ in range(10)]
    with GarbageCollection(every=2):
        assert gc.get_freeze_count() >= len(keep)
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()
    gc.disable()
    with GarbageCollection(every=0):
        assert not gc.isenabled()  # automatic mode keeps the collector as it found it
    assert not gc.isenabled()
    gc.enable()
    with GarbageCollection(every=0, freeze=False):
        assert gc.get_freeze_count() == 0 and gc.isenabled()  # Python's own behaviour, measured


def test_automatic_mode_measures_the_collections_it_sees():
    with GarbageCollection(every=0) as collector:
        assert gc.isenabled()
        ref = cycle()
        gc.collect()  # stands for an automatic collection inside the step
        seconds = collector.step()
        assert ref() is None
        assert seconds > 0 and collector.collections >= 1
        assert collector.step() == 0.0  # the next step saw none


def test_step_seconds_include_the_managed_collection_and_exit_removes_the_callback():
    with GarbageCollection(every=1) as collector:
        assert collector._measure in gc.callbacks
        assert collector.step() > 0  # step 1 is an every-th step: its own collection counts
    assert collector._measure not in gc.callbacks
    assert collector.step() == 0.0  # outside the context nothing is collected or measured


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="every=-1"):
        GarbageCollection(every=-1)
