"""Dynamic micro-batch hand-out and rollout rebalancing across 2 gloo processes."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from rlhf_kit.generation.dispatch import DynamicDispatcher, _plan, iterate_dynamic, rebalance_rollouts
from tests.gloo import spawn_ranks


def _worker(rank: int) -> None:
    # rank 1 is slow: it must end up with fewer micro-batches; together they cover 0..19 exactly once
    mine = []
    for i in DynamicDispatcher(20):
        time.sleep(0.08 if rank == 1 else 0.005)
        mine.append(i)
    got = [None, None]
    dist.all_gather_object(got, mine)
    assert sorted(got[0] + got[1]) == list(range(20)), got
    assert len(got[1]) < len(got[0]), got
    # a second round uses a fresh counter
    again = [i for i, _ in iterate_dynamic(list("abcde"))]
    both = [None, None]
    dist.all_gather_object(both, again)
    assert sorted(both[0] + both[1]) == [0, 1, 2, 3, 4]

    # rollouts: rank 0 has 13, rank 1 has 8 (21 in all) with varying token counts
    n = 13 if rank == 0 else 8
    samples = [{"id": (rank, i), "response_mask": torch.ones(1 + (7 * i + 3 * rank) % 11)} for i in range(n)]
    out, stats = rebalance_rollouts(samples)
    assert len(out) == 10 and stats.counts_after == [10, 10] and stats.counts_before == [13, 8]
    assert stats.dropped == 1 and stats.moved >= 2
    ids = [None, None]
    dist.all_gather_object(ids, [s["id"] for s in out])
    everything = {(r, i) for r, k in ((0, 13), (1, 8)) for i in range(k)}
    assert len(set(ids[0]) | set(ids[1])) == 20 and set(ids[0]).isdisjoint(ids[1])
    assert set(ids[0]) | set(ids[1]) <= everything
    tokens = sum(int(s["response_mask"].sum()) for s in out)
    assert tokens == stats.tokens_after[rank]
    # keep the remainder instead: 11 / 10
    out, stats = rebalance_rollouts(samples, drop_remainder=False)
    assert stats.counts_after == [11, 10] and stats.dropped == 0 and len(out) == [11, 10][rank]


def test_dynamic_dispatch_and_rebalance(tmp_path):
    spawn_ranks(_worker, str(tmp_path / "store"))


def test_plan_balances_counts_and_tokens():
    sizes = [[9, 1, 1, 1, 1, 1, 1, 1], [5, 5], [2]]  # 11 samples over 3 ranks -> 3 each, 2 dropped
    assignment, dropped = _plan(sizes, drop_remainder=True)
    assert [len(a) for a in assignment] == [3, 3, 3] and len(dropped) == 2
    flat = [x for a in assignment for x in a] + dropped
    assert sorted(flat) == sorted((r, i) for r, s in enumerate(sizes) for i in range(len(s)))
    tokens = [sum(sizes[o][i] for o, i in a) for a in assignment]
    assert max(tokens) - min(tokens) <= 9  # the 9-token sample dominates rank 0
    assignment, dropped = _plan([[1, 1], [1, 1]], drop_remainder=True)
    assert dropped == [] and assignment == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]  # nothing moves
