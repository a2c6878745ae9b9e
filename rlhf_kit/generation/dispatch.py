"""Work across data-parallel ranks: dynamic hand-out of prompt micro-batches, then rebalancing rollouts.

Generation time per micro-batch varies (response lengths, early exit), so a static split leaves fast
ranks idle. :class:`DynamicDispatcher` hands out micro-batch indices through one atomic counter in the
process group's key-value store (``store.add``): a rank asks for the next index when it is free, so a rank
that finishes early takes more. Afterwards ranks hold different numbers of rollouts;
:func:`rebalance_rollouts` moves the surplus so every rank trains on the same number of samples, giving
the largest samples to the ranks with the fewest tokens so token counts end up close too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_ROUNDS = itertools.count()


def _default_store() -> Any:
    if not dist.is_initialized():
        raise ValueError("DynamicDispatcher needs torch.distributed initialised, or an explicit store=")
    return dist.distributed_c10d._get_default_store()


class DynamicDispatcher:
    """Iterate micro-batch indices ``0 .. num_items - 1``, each handed to exactly one rank, first come first
    served.

    Args:
        num_items: how many micro-batches this round has (the same on every rank).
        store: a ``torch.distributed.Store`` shared by the ranks; default: the default process group's.
        name: key prefix. Each dispatcher uses a fresh key ``{name}/{round}``, where ``round`` counts the
            dispatchers created in this process -- create them in the same order on every rank.

    Example::

        for i in DynamicDispatcher(len(micro_batches)):
            rollouts += generate(micro_batches[i])
        rollouts, stats = rebalance_rollouts(rollouts)
    """

    def __init__(self, num_items: int, store: Any = None, name: str = "rlhf_kit/dispatch") -> None:
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        self.num_items = num_items
        self.store = store if store is not None else _default_store()
        self.key = f"{name}/{next(_ROUNDS)}"
        self.taken: list[int] = []

    def __iter__(self) -> Iterator[int]:
        while True:
            index = int(self.store.add(self.key, 1)) - 1
            if index >= self.num_items:
                return
            self.taken.append(index)
            yield index


def iterate_dynamic(items: Sequence[Any], **kw: Any) -> Iterator[tuple[int, Any]]:
    """``(index, items[index])`` pairs handed out by a :class:`DynamicDispatcher` over ``items``."""
    for i in DynamicDispatcher(len(items), **kw):
        yield i, items[i]


def default_num_tokens(sample: Any) -> int:
    """Tokens a rollout trains on: ``response_mask.sum()`` for dicts/objects that have one, else 1."""
    mask = sample.get("response_mask") if isinstance(sample, dict) else getattr(sample, "response_mask", None)
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else 1


@dataclass
class RebalanceStats:
    """What :func:`rebalance_rollouts` did (identical on every rank)."""

    counts_before: list[int]
    counts_after: list[int]
    tokens_after: list[int]
    moved: int
    dropped: int


def _plan(
    sizes: list[list[int]], drop_remainder: bool
) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """Deterministic assignment: ``keep[r]`` / pool moves as ``(origin_rank, local_index)`` lists."""
    world = len(sizes)
    total = sum(len(s) for s in sizes)
    base, extra = divmod(total, world)
    quota = [base + (0 if drop_remainder else int(r < extra)) for r in range(world)]
    keep: list[list[tuple[int, int]]] = []
    pool: list[tuple[int, int]] = []
    for r, s in enumerate(sizes):
        # each rank keeps its largest samples up to its quota; the rest go to the pool
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))
        keep.append([(r, i) for i in order[: quota[r]]])
        pool.extend((r, i) for i in order[quota[r] :])
    pool.sort(key=lambda ri: (-sizes[ri[0]][ri[1]], ri))
    dest: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    tokens = [sum(sizes[o][i] for o, i in k) for k in keep]
    dropped: list[tuple[int, int]] = []
    for item in pool:
        open_ranks = [r for r in range(world) if len(keep[r]) + len(dest[r]) < quota[r]]
        if not open_ranks:
            dropped.append(item)
            continue
        r = min(open_ranks, key=lambda q: (tokens[q], q))
        dest[r].append(item)
        tokens[r] += sizes[item[0]][item[1]]
    return [k + d for k, d in zip(keep, dest)], dropped


def rebalance_rollouts(
    samples: list[Any],
    group: Any = None,
    num_tokens: Callable[[Any], int] = default_num_tokens,
    drop_remainder: bool = True,
) -> tuple[list[Any], RebalanceStats]:
    """Exchange rollouts so every rank of ``group`` ends with the same number of samples.

    All ranks all-gather the sample sizes, compute the same plan (each rank keeps its largest samples up
    to the quota ``total // world``; surplus goes largest-first to the rank with the fewest tokens), then
    only the moving samples travel (``all_gather_object`` of each rank's outgoing list). With
    ``drop_remainder`` the ``total % world`` smallest surplus samples are dropped and counted in
    ``stats.dropped``; otherwise the first ``total % world`` ranks get one more. Samples are any picklable
    objects (tensors are moved to CPU by pickling; put them back on the device after).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes_local = [int(num_tokens(s)) for s in samples]
    sizes: list[list[int]] = [[] for _ in range(world)]
    dist.all_gather_object(sizes, sizes_local, group=group)
    assignment, dropped = _plan(sizes, drop_remainder)
    outgoing: dict[int, list[tuple[int, Any]]] = {}
    for r, items in enumerate(assignment):
        if r == rank:
            continue
        for origin, i in items:
            if origin == rank:
                outgoing.setdefault(r, []).append((i, samples[i]))
    gathered: list[dict[int, list[tuple[int, Any]]]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, outgoing, group=group)
    incoming = {(origin, i): s for origin, out in enumerate(gathered) for i, s in out.get(rank, [])}
    mine = [samples[i] if origin == rank else incoming[(origin, i)] for origin, i in assignment[rank]]
    stats = RebalanceStats(
        counts_before=[len(s) for s in sizes],
        counts_after=[len(a) for a in assignment],
        tokens_after=[sum(sizes[o][i] for o, i in a) for a in assignment],
        moved=sum(1 for r, a in enumerate(assignment) for o, _ in a if o != r),
        dropped=len(dropped),
    )
    return mine, stats
