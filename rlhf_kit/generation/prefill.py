"""The prompt pass (prefill) of :class:`~rlhf_kit.generation.compiled.CompiledBackend`: padded, or packed.

Prompts arrive left padded to the batch's widest, and a padded prefill runs every slot of that
rectangle through the model. HH prompts cut at 128 tokens fill about two thirds of it (64 of them: 5,557
real tokens of 8,192), and the prefill of a 1B model is bound by its matrix products, so the padding costs
its full share of the time. Packed, the real tokens of every row are laid end to end in one ``(1, T)``
row, attention is causal within each prompt (variable-length flash attention, through
:mod:`rlhf_kit.models.varlen`), and each token's key and value are written to the slot the padded prefill
would have written, so the decode steps after it are unchanged. The padded prefill (a dense causal mask over the rectangle) runs
where packing is off, would not save tokens, or on the first call (which allocates the KV buffers).

``T`` is rounded up to a multiple (:func:`packed_multiple`) with a filler segment, so compiled blocks see
a few distinct lengths. The filler's keys and values go to the last slot of the first row, a slot every
decode step either never reaches or overwrites before reading it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhf_kit.models.transfer import host_tensor
from rlhf_kit.models.varlen import packed_attention, packing, unsupported_reason

#: The attention implementation named during a packed prefill: the static-cache attention function,
#: registered without a mask function, so transformers builds no mask and passes the packed boundaries.
PACKED_IMPLEMENTATION = "rlhf_kit_static_kv_packed"

PACKED_PREFILL = ("auto", "on", "off")

#: ``"auto"`` packs the prefill of models at least this wide (``hidden_size``). Measured on an H100 with 64
#: HH prompts (5,557 real tokens of 8,192; docs/benchmarks.md, session 27): 2048 wide (1B) the prefill took
#: 26.1-26.3 ms packed against 31.3-31.9 padded; 1024 wide it was a tie (9.4 against 9.3 ms) and 576 wide
#: (30 layers) packed was slower (15.6 against 10.1 ms). Inside PPO config B's loop (the same 1B widths,
#: new prompts every step) generation was 9 ms slower packed, and each new packed length compiled the
#: blocks again (7-8 s), so the backend's default is ``"off"``.
PACKED_PREFILL_MIN_HIDDEN = 2048


@dataclass
class PackedPrefill:
    """One packed prefill of ``b`` left-padded rows ``width`` wide (all tensors on the model's device).

    ``gather (T,)``: each packed token's index into the flattened ``(b, width)`` prompt (the filler reads
    index 0); ``rows``/``slots (T,)``: the cache row and slot of each token's key and value; ``last (b,)``:
    the packed index of each row's last token (0 for rows without tokens: the bucket's padding rows);
    ``kwargs``: the varlen keyword arguments and position ids of the model's forward; ``shape``: what a
    compiled block specialises on (total, longest segment, number of boundaries).
    """

    gather: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    last: torch.Tensor
    kwargs: dict[str, Any]
    shape: tuple[int, int, int]


def packed_multiple(b: int, width: int) -> int:
    """The packed length's rounding: a power of two of at least an eighth of the padded ``b x width``
    (at least 64), so one batch shape compiles at most eight packed lengths, each within an eighth of
    the padded size above the real tokens."""
    target = max(64, -(-b * width // 8))
    return 1 << (target - 1).bit_length()


def plan_packed_prefill(
    lengths: Sequence[int], b: int, width: int, cache_len: int, device: torch.device
) -> PackedPrefill | None:
    """The packed prefill of rows with ``lengths`` real tokens (the first ``len(lengths)`` rows of a bucket
    of ``b``, each left padded to ``width``, every length at least 1), or None where packing would not run
    fewer tokens than the padded ``b x width``. ``cache_len``: the KV cache's slots per row."""
    n = len(lengths)
    host = [int(x) for x in lengths]
    lens = torch.tensor(host, dtype=torch.long)
    pack = packing(lens, packed_multiple(b, width), host=host)
    if pack.total >= b * width:
        return None
    real = int(lens.sum())
    row = torch.repeat_interleave(torch.arange(n), lens)  # (real,)
    starts = torch.cumsum(lens, 0) - lens
    offset = torch.arange(real) - starts[row]  # position within the prompt
    col = width - lens[row] + offset  # the column (and cache slot) of a left-padded prompt
    filler = pack.total - real
    gather = torch.cat([row * width + col, torch.zeros(filler, dtype=torch.long)])
    rows = torch.cat([row, torch.zeros(filler, dtype=torch.long)])
    slots = torch.cat([col, torch.full((filler,), cache_len - 1, dtype=torch.long)])
    positions = torch.cat([offset, torch.arange(filler)])
    last = torch.zeros(b, dtype=torch.long)
    last[:n] = starts + lens - 1
    moved = [host_tensor(t, device) for t in (gather, rows, slots, last, positions[None], pack.cu_seqlens)]
    cu = moved[5]
    kwargs = {"position_ids": moved[4], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
              "max_length_q": pack.max_len, "max_length_k": pack.max_len}  # fmt: skip
    return PackedPrefill(*moved[:4], kwargs, (pack.total, pack.max_len, int(cu.numel())))


def packed_prefill_usable(setting: bool | str, model: nn.Module, device: torch.device, width: int) -> bool:
    """Whether ``setting`` (``"auto"``, ``"on"``/True, ``"off"``/False) packs the prefill of prompts
    ``width`` wide: ``"auto"`` on CUDA with variable-length flash attention, for the model types whose
    packed passes are verified (:func:`~rlhf_kit.models.varlen.unsupported_reason`) and at least
    :data:`PACKED_PREFILL_MIN_HIDDEN` wide; ``"on"`` anywhere
    (elsewhere the packed attention is one SDPA call under a block-diagonal mask: for tests), refusing
    a model it cannot run exactly."""
    from rlhf_kit.models import varlen

    if setting in (False, "off"):
        return False
    if setting not in (True, "on", "auto"):
        raise ValueError(f"packed_prefill must be 'auto', 'on' or 'off' (or a bool), got {setting!r}")
    reason = unsupported_reason(model, width)
    if setting != "auto":
        if reason:
            raise ValueError(f"packed_prefill is on, but {reason}")
        return True
    usable = reason is None and device.type == "cuda" and varlen._varlen_attn is not None
    return usable and varlen._hidden_size(model) >= PACKED_PREFILL_MIN_HIDDEN


def register(attention_fn: Any) -> None:
    """Register ``attention_fn`` (the static-cache attention) as :data:`PACKED_IMPLEMENTATION`, with no
    mask function."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_IMPLEMENTATION, attention_fn)


def prefill_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, state: Any, plan: PackedPrefill | None
) -> torch.Tensor:
    """The prompts' pass through ``model`` with ``state`` (the backend's ``_KVState``) active, filling its
    KV cache; returns the logits ``(b, V)`` after each row's last prompt token. ``ids``/``mask (b, p)``
    left padded; ``plan``: packed (:func:`plan_packed_prefill`), or None: padded."""
    from rlhf_kit.generation.static_cache import prefill_inputs

    if plan is None:
        dtype = next(model.parameters()).dtype
        prefill_mask, position_ids = prefill_inputs(mask, dtype)
        out = model(input_ids=ids, position_ids=position_ids, attention_mask=prefill_mask, use_cache=False,
                    logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1, :]
    with packed_forward(model, state, plan):
        packed = ids.view(-1)[plan.gather][None]
        return model(input_ids=packed, use_cache=False, logits_to_keep=plan.last, **plan.kwargs).logits[0]


@contextlib.contextmanager
def packed_forward(model: nn.Module, state: Any, plan: PackedPrefill) -> Iterator[None]:
    """While active, ``model``'s attention is the static-cache function without a mask, and ``state`` (the
    backend's ``_KVState``) holds where each packed token's key and value go."""
    state.packed = (plan.rows, plan.slots)
    try:
        with packed_attention(model, PACKED_IMPLEMENTATION):
            yield
    finally:
        state.packed = None
