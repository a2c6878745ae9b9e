"""Batch-size arithmetic: global batch = micro batch x gradient accumulation x world size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def resolve_batch_sizes(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Number of gradient-accumulation steps that makes ``micro_batch * accum * world_size == global_batch``.

    Raises ``ValueError`` with a one-line explanation when the sizes are not positive or do not divide.
    """
    for name, value in (
        ("global batch", global_batch),
        ("micro batch", micro_batch),
        ("world size", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_step = micro_batch * world_size
    if global_batch % per_step != 0:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro batch {micro_batch} x world size "
            f"{world_size} = {per_step}"
        )
    return global_batch // per_step


def epoch_order(
    n: int, seed: int, epoch: int, lengths: Sequence[int] | None = None, group_size: int = 1
) -> list[int]:
    """A reproducible permutation of ``range(n)`` for one epoch (depends only on ``seed + epoch``).

    With ``lengths``, examples of similar length are grouped in runs of ``group_size`` (less padding)
    through :class:`rlhf_kit.data.LengthGroupedSampler`.
    """
    if lengths is not None:
        from rlhf_kit.data.sampling import LengthGroupedSampler

        sampler = LengthGroupedSampler(lengths, batch_size=max(1, group_size), seed=seed)
        sampler.set_epoch(epoch)
        return sampler.indices()
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class BatchPlan:
    """Which examples every optimizer step uses, as a pure function of the step number.

    Each epoch is a fresh permutation (:func:`epoch_order`) cut into ``global_batch`` chunks (an
    incomplete last chunk is skipped). Because the plan depends only on ``(seed, step)``, a resumed run
    sees exactly the batches of an uninterrupted one, and micro-batch size / accumulation / world size
    only change how a global batch is split, never which examples it holds.
    """

    num_examples: int
    global_batch: int
    seed: int = 0
    lengths: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.num_examples < self.global_batch:
            raise ValueError(
                f"only {self.num_examples} training examples, fewer than one global batch of {self.global_batch}"
            )
        self._orders: dict[int, list[int]] = {}

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def global_batch_at(self, step: int) -> list[int]:
        """Example indices of optimizer step ``step`` (0-based), ``global_batch`` of them."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {
                epoch: epoch_order(self.num_examples, self.seed, epoch, self.lengths, self.global_batch)
            }
        return self._orders[epoch][k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(
        self, step: int, micro_batch: int, rank: int = 0, world_size: int = 1
    ) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: its contiguous share, cut into ``micro_batch`` chunks."""
        mine = self.share(step, rank, world_size)
        return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]

    def share(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Rank ``rank``'s contiguous share of step ``step``'s global batch (``global_batch / world_size``)."""
        indices = self.global_batch_at(step)
        per_rank = len(indices) // world_size
        return indices[rank * per_rank : (rank + 1) * per_rank]


def split_by_token_budget(
    indices: Sequence[int], lengths: Sequence[int], budget: int, parts: int | None = None
) -> list[list[int]]:
    """Cut ``indices`` into micro-batches whose padded size stays within ``budget`` tokens.

    A micro-batch of ``k`` examples, the longest of length ``L``, costs ``k * L`` padded tokens
    (``lengths[i]`` is example ``i``'s: for a pair, ``2 * max(len(chosen), len(rejected))``). Examples
    are taken longest first and a micro-batch grows while it fits; an example over the budget gets one
    of its own. With ``parts``, the largest micro-batch is halved until there are ``parts`` of them
    (every rank must run the same number of forward passes under FSDP2): ``parts`` must lie between
    the greedy count and ``len(indices)``. The result is a pure function of its arguments.
    """
    if budget < 1:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    if parts is not None:
        if not len(out) <= parts <= len(order):
            raise ValueError(
                f"cannot cut {len(order)} examples into {parts} micro-batches (at least {len(out)})"
            )
        while len(out) < parts:
            j = max(range(len(out)), key=lambda k: (len(out[k]) * lengths[out[k][0]], len(out[k])))
            if len(out[j]) < 2:  # the costliest is a single example: halve the longest splittable one
                j = max((k for k in range(len(out)) if len(out[k]) > 1), key=lambda k: len(out[k]))
            half = len(out[j]) // 2
            out[j : j + 1] = [out[j][:half], out[j][half:]]
    return out


def token_budget_micro_batches(
    plan: BatchPlan, step: int, lengths: Sequence[int], budget: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's micro-batches of step ``step`` under a padded-token ``budget``
    (:func:`split_by_token_budget`), every rank with as many micro-batches as the rank that needs most.

    Which examples form the step, and each rank's share (:meth:`BatchPlan.share`), are those of
    :meth:`BatchPlan.micro_batches`; only the cut changes. Every rank computes every rank's cut (no communication), so the counts agree.
    """
    shares = [plan.share(step, r, world_size) for r in range(world_size)]
    parts = max(len(split_by_token_budget(s, lengths, budget)) for s in shares)
    return split_by_token_budget(shares[rank], lengths, budget, parts)


def step_micro_batches(
    plan: BatchPlan,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    micro_batch_size: int,
    budget: int = 0,
    costs: Sequence[int] | None = None,
) -> list[list[int]]:
    """This rank's micro-batches of step ``step``, as the SFT and RM recipes cut them.

    ``budget > 0``: similar lengths together under a padded-token budget, where ``costs[i]`` is example
    ``i``'s padded tokens (:func:`token_budget_micro_batches`; every rank runs as many micro-batches).
    ``budget == 0``: fixed micro-batches of ``micro_batch_size`` (:meth:`BatchPlan.micro_batches`).
    """
    if budget:
        if costs is None:
            raise ValueError("step_micro_batches: a token budget needs the examples' costs")
        return token_budget_micro_batches(plan, step, costs, budget, rank, world_size)
    return plan.micro_batches(step, micro_batch_size, rank, world_size)
