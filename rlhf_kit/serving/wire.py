"""The critic server's wire format and request checks, shared by the service, the server and the client.

A message (both directions) is an 8-byte little-endian length, a UTF-8 JSON object of scalars, then the
``safetensors`` bytes of the tensors. Every check here raises a one-line ``ValueError`` naming the field,
which the server answers with HTTP 400.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

#: Integer dtypes accepted for token ids and masks (int8/uint8 would wrap real vocabularies).
ID_DTYPES = (torch.int64, torch.int32)
MASK_DTYPES = (torch.int64, torch.int32, torch.bool)


def encode(meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """``meta`` (JSON scalars) and ``tensors`` as one message: length, JSON, safetensors bytes."""
    head = json.dumps(meta).encode()
    out, seen = {}, set()
    for k, v in (tensors or {}).items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v  # safetensors refuses tensors that share memory
        seen.add(ptr)
    body = save_tensors(out)
    return struct.pack("<Q", len(head)) + head + body


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode`; raises ``ValueError`` on a malformed message."""
    if len(message) < 8:
        raise ValueError(f"message of {len(message)} bytes is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", message[:8])
    if 8 + n > len(message):
        raise ValueError(f"message header claims {n} bytes of JSON but only {len(message) - 8} follow")
    try:
        meta = json.loads(message[8 : 8 + n])
        tensors = load_tensors(message[8 + n :])
    except Exception as e:  # json / safetensors errors of a corrupt body
        raise ValueError(
            f"malformed message: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError("malformed message: the JSON header is not an object")
    return meta, tensors


# ------------------------------------------------------------------------------------------ fields
def field(mapping: dict, name: str, kind: str = "field"):
    """``mapping[name]``, or a one-line ``ValueError`` saying the request lacks it."""
    if name not in mapping:
        raise ValueError(f"request has no {kind} {name!r}")
    return mapping[name]


def int_field(meta: dict, name: str, default: Any = ...) -> int:
    """An integer JSON field (``true``/``1.5``/``"3"`` are refused)."""
    v = field(meta, name) if default is ... else meta.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"field {name!r} must be an integer, got {v!r}")
    return v


def float_field(meta: dict, name: str) -> float:
    """A finite number JSON field."""
    v = field(meta, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"field {name!r} must be a finite number, got {v!r}")
    return float(v)


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


# ------------------------------------------------------------------------------------------ tensors
def _check_binary(name: str, x: torch.Tensor) -> None:
    if x.dtype not in MASK_DTYPES:
        raise ValueError(f"{name} must be int64, int32 or bool, got {x.dtype}")
    if x.numel() and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")


def check_batch(
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    response_mask: torch.Tensor,
    vocab_size: int | None = None,
    **per_token: torch.Tensor,
) -> None:
    """Raise a one-line ``ValueError`` naming the field when a rollout batch is not one the models take.

    Args:
        sequences, attention_mask: ``(b, p + n)``: int64/int32 token ids in ``[0, vocab_size)``, and a
            0/1 mask with at least one real token per row. response_mask: ``(b, n)`` 0/1.
        prompt_length: ``p >= 1``. per_token: further ``(b, n)`` float tensors (finite).
    """
    if sequences.dim() != 2 or sequences.dtype not in ID_DTYPES:
        shape = tuple(sequences.shape)
        raise ValueError(
            f"sequences must be int64 or int32 token ids of shape (b, p + n), got {sequences.dtype} {shape}"
        )
    if tuple(attention_mask.shape) != tuple(sequences.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, sequences {tuple(sequences.shape)}"
        )
    b, t = sequences.shape
    if b == 0:
        raise ValueError("sequences has no rows")
    if response_mask.dim() != 2 or response_mask.shape[0] != b:
        shape = tuple(response_mask.shape)
        raise ValueError(f"response_mask must be (b, n) with b = {b} rows like sequences, got {shape}")
    n = response_mask.shape[1]
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
        raise ValueError(f"prompt_length must be an integer, got {prompt_length!r}")
    if prompt_length < 1 or prompt_length + n != t:
        raise ValueError(f"prompt_length {prompt_length} + response_mask width {n} != sequences width {t}")
    lo, hi = int(sequences.min()), int(sequences.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise ValueError(f"sequences hold token id {bad} outside the models' vocabulary [0, {vocab_size})")
    _check_binary("attention_mask", attention_mask)
    _check_binary("response_mask", response_mask)
    empty = (attention_mask.sum(1) == 0).nonzero()
    if empty.numel():
        raise ValueError(f"attention_mask row {int(empty[0])} is all zeros (no token to read)")
    for name, x in per_token.items():
        if tuple(x.shape) != (b, n):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(b, n)} like response_mask")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or infinite entries")
