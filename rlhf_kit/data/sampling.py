"""Length-grouped sampling: batches of similar lengths (less padding), still shuffled every epoch; and the
seeded hold-out of a validation split."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


def hold_out(items: Sequence[Any], n: int, seed: int) -> tuple[list, list]:
    """``(kept, held)``: ``n`` items picked by a permutation seeded with ``seed`` are held out (for
    validation), the rest kept; both keep the input order. A pure function of its arguments, so every
    rank and every resume gets the same split. The caller checks ``n`` (its error names its flag)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def pair_lengths(examples: Sequence[dict[str, Any]]) -> list[int]:
    """Length of a pair example for grouping: the longer of its chosen and rejected sides."""
    return [max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples]


class LengthGroupedSampler(Sampler[int]):
    """Yield dataset indices so that consecutive ``batch_size`` indices have similar lengths.

    Each epoch: a random permutation (seeded by ``seed + epoch``) is cut into mega-batches of
    ``batch_size * mega_batch_mult`` indices, each sorted by length, longest first; the overall longest
    example is moved to the very front (out-of-memory errors then show at step one, not hours later).
    Every index appears exactly once per epoch; use it with ``DataLoader(batch_size=batch_size)``
    (only the last batch is short). Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError("batch_size and mega_batch_mult must be positive")
        if len(lengths) == 0:
            raise ValueError("LengthGroupedSampler needs at least one length")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (a different, reproducible order per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def indices(self) -> list[int]:
        """This epoch's order of indices; consecutive runs of ``batch_size`` form the batches."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        mega = (
            self.batch_size * self.mega_batch_mult
        )  # a multiple of batch_size: only the last batch is short
        chunks = []
        for start in range(0, len(perm), mega):
            chunk = perm[start : start + mega]
            chunks.append(chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)])
        # Each chunk starts with its longest element; move the overall longest to the very front.
        heads = torch.stack([c[0] for c in chunks])
        k = int(torch.argmax(self.lengths[heads]))
        chunks[0][0], chunks[k][0] = heads[k].clone(), heads[0].clone()
        return torch.cat(chunks).tolist()

    def batches(self) -> list[list[int]]:
        """This epoch's batches of indices (only the last may be smaller than ``batch_size``)."""
        order = self.indices()
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __iter__(self) -> Iterator[int]:
        yield from self.indices()
