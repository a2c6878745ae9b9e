"""MemoryBudget: the update's micro-batch token budget grown from one measured micro-batch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rlhf_kit.training.memory_budget import MemoryBudget, MemoryProbe
from tests.gloo import spawn_ranks


class FakeDevice:
    """Allocator counters driven by hand: ``hold(n)`` allocates, ``spike(n)`` a transient peak."""

    def __init__(self, total: int, held: int = 0):
        self.total, self.now, self.top = total, held, held

    def hold(self, n: int) -> None:
        self.now += n
        self.top = max(self.top, self.now)

    def spike(self, n: int) -> None:
        self.top = max(self.top, self.now + n)

    def probe(self) -> MemoryProbe:
        def reset() -> None:
            self.top = self.now

        return MemoryProbe(lambda: self.now, lambda: self.top, reset, lambda f: int(f * self.total))


def _micro_batch(dev: FakeDevice, params: list[nn.Parameter], tokens: int, per_token: int) -> None:
    """What one forward and backward does to the counters: gradients appear, activations come and go."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
            dev.hold(p.numel() * p.element_size())
    dev.spike(tokens * per_token)


@pytest.mark.parametrize("grads_before", [False, True])
def test_budget_grows_to_what_the_measured_micro_batch_says_fits(grads_before):
    params = [nn.Parameter(torch.zeros(1000))]  # 4,000 bytes of gradient
    dev = FakeDevice(total=100_000, held=10_000)  # weights, optimizer state, caches
    if grads_before:  # the gradients may exist already (accumulation) or appear in this backward
        _micro_batch(dev, params, 0, 0)
    budget = MemoryBudget(tokens=100, fraction=0.5, max_tokens=10**6, probe=dev.probe())
    budget.update_done()
    assert budget.wants_measurement()
    with budget.measure(100, params):
        _micro_batch(dev, params, 100, per_token=50)
    # 50 bytes per token; 50,000 may be filled, 10,000 held and 4,000 of gradients: 36,000 / 50
    assert budget.bytes_per_token == 50
    assert budget.tokens == 720 and budget.measured and not budget.wants_measurement()


def test_budget_never_shrinks_and_stops_at_a_whole_mini_batch():
    params = [nn.Parameter(torch.zeros(10))]
    for total, expected in ((10_000, 100), (10**9, 5000)):  # too little memory: the configured 100 stays
        dev = FakeDevice(total=total, held=4000)
        budget = MemoryBudget(tokens=100, fraction=0.5, max_tokens=5000, probe=dev.probe())
        budget.update_done()
        with budget.measure(100, params):
            _micro_batch(dev, params, 100, per_token=40)
        assert budget.tokens == expected


def test_measured_only_in_the_second_update_with_a_probe():
    dev = FakeDevice(total=10**6)
    budget = MemoryBudget(tokens=8, fraction=0.8, max_tokens=64, probe=dev.probe())
    assert not budget.wants_measurement()  # the first update makes the optimizer state
    budget.update_done()
    assert budget.wants_measurement()
    for other in (
        MemoryBudget(tokens=8, fraction=0.8, max_tokens=64, probe=None),  # CPU
        MemoryBudget(tokens=8, fraction=0.0, max_tokens=64, probe=dev.probe()),  # switched off
        MemoryBudget(tokens=64, fraction=0.8, max_tokens=64, probe=dev.probe()),  # already a whole mini-batch
    ):
        other.update_done()
        assert not other.wants_measurement()


def test_state_round_trips_and_bad_settings_are_refused():
    dev = FakeDevice(total=10**6)
    a = MemoryBudget(tokens=8, fraction=0.8, max_tokens=10**4, probe=dev.probe())
    a.update_done()
    params = [nn.Parameter(torch.zeros(4))]
    with a.measure(8, params):
        _micro_batch(dev, params, 8, per_token=100)
    b = MemoryBudget(tokens=8, fraction=0.8, max_tokens=10**4, probe=dev.probe())
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.tokens > 8 and not b.wants_measurement()
    with pytest.raises(ValueError, match="tokens"):
        MemoryBudget(tokens=0, fraction=0.5, max_tokens=8)
    with pytest.raises(ValueError, match="fraction"):
        MemoryBudget(tokens=8, fraction=1.0, max_tokens=8)


def _two_ranks(out: str, rank: int) -> None:
    assert dist.get_world_size() == 2
    dev = FakeDevice(total=(1 + rank) * 100_000)  # rank 1 has twice the memory
    budget = MemoryBudget(tokens=10, fraction=0.5, max_tokens=10**6, probe=dev.probe())
    budget.update_done()
    with budget.measure(10, []):
        dev.spike(10 * 10)
    torch.save(budget.tokens, f"{out}/{rank}.pt")


def test_every_rank_takes_the_smallest_ranks_budget(tmp_path):
    spawn_ranks(partial(_two_ranks, str(tmp_path)), str(tmp_path / "store"))
    # rank 0 fits 50,000 / 10 tokens, rank 1 twice that: both cut by rank 0's
    assert [torch.load(tmp_path / f"{r}.pt") for r in range(2)] == [5000, 5000]


def test_a_probe_reset_keeps_the_runs_peak_for_the_logged_memory(monkeypatch):
    """cuda_probe resets PyTorch's peak counters to measure one micro-batch; the run's logged peak
    (device_memory_stats) must still cover what came before (here CUDA's counters are faked)."""
    from rlhf_kit.training import memory_budget as mb
    from rlhf_kit.training.metrics import device_memory_stats

    counters = {"allocated": 1 << 30, "peak": 6 << 30, "reserved_peak": 7 << 30}

    def reset(device=None):
        counters["peak"] = counters["reserved_peak"] = counters["allocated"]

    fake = {
        "is_available": lambda: True,
        "current_device": lambda: 0,
        "memory_allocated": lambda device=None: counters["allocated"],
        "max_memory_allocated": lambda device=None: counters["peak"],
        "max_memory_reserved": lambda device=None: counters["reserved_peak"],
        "memory_reserved": lambda device=None: counters["allocated"],
        "reset_peak_memory_stats": reset,
        "mem_get_info": lambda device=None: (70 << 30, 80 << 30),
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(mb, "_PEAKS_BEFORE", {})
    probe = mb.cuda_probe("cuda:0")
    assert probe.capacity(0.5) == 40 << 30  # half of 80 GiB; 71 GiB free or held by this process
    probe.reset_peak()
    assert probe.peak() == 1 << 30  # the measurement sees only what comes after the reset
    stats = device_memory_stats()
    assert stats["memory/peak_allocated_gib"] == 6 and stats["memory/peak_reserved_gib"] == 7
    counters["peak"] = 9 << 30  # a larger peak later is reported as such
    assert device_memory_stats()["memory/peak_allocated_gib"] == 9
    mb.forget_peaks()
    counters["peak"] = 2 << 30
    assert device_memory_stats()["memory/peak_allocated_gib"] == 2


def test_sharded_gradients_count_this_ranks_shard_only():
    """An FSDP2 parameter's gradient is a DTensor whose numel() is the whole tensor's; the memory on this
    device is its local shard, which is what the measurement must subtract."""
    from types import SimpleNamespace

    from rlhf_kit.training.memory_budget import _grad_bytes

    class Sharded:  # DTensor's relevant surface: the global numel, to_local() for this rank's shard
        def __init__(self, whole: int, local: int):
            self.whole, self.local = whole, torch.zeros(local)

        def numel(self) -> int:
            return self.whole

        def element_size(self) -> int:
            return 4

        def to_local(self) -> torch.Tensor:
            return self.local

    params = [SimpleNamespace(grad=Sharded(1000, 250)), SimpleNamespace(grad=torch.zeros(10)), SimpleNamespace(grad=None)]
    assert _grad_bytes(params) == 250 * 4 + 10 * 4
