"""Left-padded rows run as right-padded ones, so attention needs no mask.

PPO's rows are a left-padded prompt followed by a right-padded response: each row's real tokens are one
contiguous run. Moved to the front of its row, every real token precedes the row's pads, and causal
attention alone is then exact for every real token: the forward pass takes SDPA's causal (flash) path
and transformers builds no ``(b, 1, t, t)`` mask. Position ids are unchanged (``0, 1, ...`` from the
first real token either way). The reward model's right-padded pairs already run this way
(:func:`rlhf_kit.models.reward.reward_scores`); this module does the same for left-padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LeftAlignment:
    """How to move each row's real tokens to the front: ``shifts (b,)`` columns per row."""

    shifts: torch.Tensor
    max_shift: int
    contiguous: bool
    """Every row's real tokens form one run (no padding between them); only then is the move exact."""
    lengths: tuple[int, ...] | None = None
    """Each row's real-token count on the host, when it was read with the rest (:func:`left_alignment`):
    a packed pass then needs no read of its own (:func:`rlhf_kit.models.varlen.packing`)."""

    def align(self, x: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
        """``x (b, t, ...)`` with row ``r`` moved ``shifts[r]`` columns to the left, ``fill`` after it."""
        t = x.shape[1]
        index = torch.arange(t, device=x.device) + self.shifts.to(x.device)[:, None]
        moved = x.gather(1, index.clamp(max=t - 1).view(*index.shape, *[1] * (x.dim() - 2)).expand_as(x))
        beyond = (index >= t).view(*index.shape, *[1] * (x.dim() - 2))
        return moved.masked_fill(beyond, fill)

    def response_index(self, prompt_length: int, n: int, offset: int = -1) -> torch.Tensor:
        """``(b, n)`` aligned columns of the positions ``prompt_length + offset + i`` (``i < n``) of the
        original layout: with the default offset, the positions whose outputs predict response token i."""
        cols = torch.arange(n, device=self.shifts.device) + prompt_length + offset
        return cols[None, :] - self.shifts[:, None]


def real_runs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``attention_mask (b, t)``, on its device (no host read): the first real column (0 for a
    row without real tokens) and whether the real tokens form one contiguous run (a row without real
    tokens counts as one)."""
    m = attention_mask.bool()
    real = m.any(-1)
    first = torch.where(real, m.int().argmax(-1), 0)
    last = torch.where(m, torch.arange(m.shape[1], device=m.device), -1).amax(-1)
    return first, (last - first + 1 == m.sum(-1)) | ~real


def left_alignment(attention_mask: torch.Tensor) -> LeftAlignment:
    """The :class:`LeftAlignment` of ``attention_mask (b, t)``: each row's leading padding, whether every
    row's real tokens are contiguous, and each row's real-token count. One device-to-host read. A row
    without real tokens counts as contiguous with no shift."""
    first, contiguous = real_runs(attention_mask)
    counts = attention_mask.ne(0).sum(-1)
    host = torch.cat([torch.stack([first.max(), contiguous.all().long()]), counts]).tolist()
    return LeftAlignment(first, int(host[0]), bool(host[1]), tuple(int(c) for c in host[2:]))
