"""Batch collators: padded and padding-free (packed) pairs, left-padded prompts, SFT.

Padded pair batches stack chosen rows ``[0, b)`` and rejected rows ``[b, 2b)`` so the reward model
scores both in one forward pass. Packed batches concatenate all sequences into one row ``(1, T)`` with
``position_ids`` restarting at 0 for each sequence: transformers builds a block-diagonal causal mask
from restarting positions (sdpa/eager/flex) or uses variable-length kernels (flash attention), so no
token attends across a sequence boundary and no compute is spent on padding. See
:mod:`rlhf_kit.models.packing` for the forward pass and the model families it is verified on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_kit.data.tokenize import IGNORE_INDEX


def pad_right(
    rows: Sequence[Sequence[int]], value: int, pad_to_multiple_of: int | None = None
) -> torch.Tensor:
    """Right-pad lists of ids into a ``(n, t)`` long tensor (``t`` optionally rounded up)."""
    width = _width(rows, pad_to_multiple_of)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_left(
    rows: Sequence[Sequence[int]], value: int, pad_to_multiple_of: int | None = None
) -> torch.Tensor:
    """Left-pad lists of ids into a ``(n, t)`` long tensor (``t`` optionally rounded up)."""
    width = _width(rows, pad_to_multiple_of)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


def _width(rows: Sequence[Sequence[int]], multiple: int | None) -> int:
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    return width


def _pair_rows(examples: Sequence[dict[str, Any]]) -> list[list[int]]:
    return [list(e["chosen_input_ids"]) for e in examples] + [list(e["rejected_input_ids"]) for e in examples]


@dataclass
class PairCollator:
    """Pair examples -> ``{"input_ids": (2b, t), "attention_mask": (2b, t)}``, right padded.

    Rows ``[0, b)`` are the chosen sequences and rows ``[b, 2b)`` the rejected ones, in example order.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = _pair_rows(examples)
        input_ids = pad_right(rows, self.pad_token_id, self.pad_to_multiple_of)
        attention_mask = pad_right([[1] * len(r) for r in rows], 0, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def pack(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate sequences into one row.

    Returns ``input_ids (1, T)``, ``position_ids (1, T)`` restarting at 0 per sequence, and
    ``last_index (n,)``: the index in the row of each sequence's last token.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("cannot pack an empty batch or an empty sequence")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    input_ids = torch.tensor([t for r in rows for t in r], dtype=torch.long).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
    last_index = lengths.cumsum(0) - 1
    return input_ids, position_ids, last_index


@dataclass
class PackedPairCollator:
    """Pair examples -> one padding-free row (chosen sequences first, then rejected).

    Returns ``{"input_ids": (1, T), "position_ids": (1, T), "last_index": (2b,)}``; score it with
    :func:`rlhf_kit.models.packing.packed_sequence_scores`. There is no attention mask: it must stay
    absent so that transformers derives the per-sequence mask from ``position_ids``.
    """

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, position_ids, last_index = pack(_pair_rows(examples))
        return {"input_ids": input_ids, "position_ids": position_ids, "last_index": last_index}


@dataclass
class PromptCollator:
    """Prompt ids (lists, or ``{"input_ids": [...]}`` examples) -> left-padded batch for generation.

    Returns ``{"input_ids": (b, t), "attention_mask": (b, t)}`` with padding on the left, so every
    prompt ends at the last column where generation continues.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = [list(e["input_ids"]) if isinstance(e, dict) else list(e) for e in examples]
        input_ids = pad_left(rows, self.pad_token_id, self.pad_to_multiple_of)
        attention_mask = pad_left([[1] * len(r) for r in rows], 0, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class SFTCollator:
    """SFT examples -> ``{"input_ids", "attention_mask", "labels"}``, each ``(b, t)``, right padded.

    Padding positions get ``labels = -100`` (ignored by the loss) as the prompt tokens already do.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [list(e["input_ids"]) for e in examples]
        return {
            "input_ids": pad_right(rows, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0, self.pad_to_multiple_of),
            "labels": pad_right([list(e["labels"]) for e in examples], IGNORE_INDEX, self.pad_to_multiple_of),
        }


@dataclass
class PackedSFTCollator:
    """SFT examples -> one padding-free row ``{"input_ids", "position_ids", "labels"}``, each ``(1, T)``.

    The first token of every sequence gets ``labels = -100``: HF causal-LM losses shift labels by one,
    so that label would otherwise be predicted from the previous sequence's last token. Call the model
    with ``use_cache=False`` (a cache disables the packed-mask detection in transformers).
    """

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, position_ids, _ = pack([list(e["input_ids"]) for e in examples])
        labels = torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.long).unsqueeze(0)
        labels[position_ids == 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
