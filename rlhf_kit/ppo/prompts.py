"""The prompts of PPO: an endless, seeded, resumable stream shared by all data-parallel ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PromptStream:
    """An endless, resumable stream of tokenised prompts: shuffled each epoch with ``seed + epoch``.

    ``next_batch(n)`` returns the next ``n`` prompts of the global order; a data-parallel rank takes its
    own slice with ``rank`` / ``world_size``. ``state_dict()`` is the exact data position.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptStream: no prompts")
        self.prompts = [list(p) for p in prompts]
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self, n: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The next ``n`` prompts of the global stream (all ranks advance together); this rank gets
        rows ``rank::world_size`` of them."""
        out = []
        for _ in range(n):
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._make_order()
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out[rank::world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = self._make_order()


def repeat_prompts(prompts: Sequence[Sequence[int]], k: int) -> list[list[int]]:
    """Each prompt ``k`` times in a row: the layout of groups (``[a, a, b, b]`` for ``k = 2``) that the
    group estimators of ``rlhf_kit.estimators`` and ``RolloutBuffer(group_size=k)`` expect."""
    return [list(p) for p in prompts for _ in range(k)]
