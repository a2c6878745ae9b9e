"""The static KV cache of :class:`~rlhf_kit.generation.compiled.CompiledBackend`: per-layer KV buffers, the
attention-interface function that writes and reads them (registered in transformers as
``"rlhf_kit_static_kv"``), and the per-bucket static buffers a captured decode step reads and writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLEMENTATION = "rlhf_kit_static_kv"


class _KVState:
    """Per-layer static KV buffers ``(max_batch, kv_heads, L, head_dim)`` plus the write slot."""

    def __init__(self, max_batch: int, max_len: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)

    def buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            # zeros, not empty: masked slots are multiplied by 0 in P @ V, and 0 * NaN would be NaN
            shape = (self.max_batch, like.shape[1], self.max_len, like.shape[3])
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


_ACTIVE: _KVState | None = None


@contextlib.contextmanager
def _activate(state: _KVState) -> Iterator[None]:
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, state
    try:
        yield
    finally:
        _ACTIVE = prev


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def static_kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: static-cache attention when a state is active, else SDPA.

    ``query (b, h, q, d)``, ``key``/``value (b, kv, q, d)``; returns ``(b, q, h, d)``. With ``q == 1``
    (decode) the new key/value go to slot ``cache_pos`` and the query's heads are grouped per KV head
    (``(b, kv, h / kv, d)``), so grouped-query attention reads the cache once, without repeating it.
    """
    state = _ACTIVE
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    k_buf, v_buf = state.buffers(module.layer_idx, key)
    k_buf, v_buf = k_buf[:b], v_buf[:b]
    if q_len == 1:
        k_buf.index_copy_(2, state.cache_pos, key)
        v_buf.index_copy_(2, state.cache_pos, value)
        grouped = query.reshape(b, kv, h // kv, d)
        out = F.scaled_dot_product_attention(grouped, k_buf, v_buf, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, h, d), None
    k_buf[:, :, :q_len].copy_(key)
    v_buf[:, :, :q_len].copy_(value)
    k, v = _repeat_kv(key, h // kv), _repeat_kv(value, h // kv)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    """Register the attention function, and SDPA's mask builder under the same name so that outside
    generation (no active state) the model gets exactly the masks -- padding included -- of ``"sdpa"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, static_kv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ----------------------------------------------------------------------------------------------------
# per-bucket static buffers


class _Buffers:
    """Static tensors of one batch bucket: every decode-step input and output lives here."""

    def __init__(self, b: int, max_len: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        kw = dict(device=device)
        self.b = b
        self.tok = torch.zeros(b, 1, dtype=torch.long, **kw)
        self.pos = torch.zeros(b, 1, dtype=torch.long, **kw)
        self.mask = torch.zeros(b, 1, 1, max_len, dtype=dtype, **kw)
        self.finished = torch.zeros(b, dtype=torch.bool, **kw)
        self.out_tok = torch.zeros(b, max_len, dtype=torch.long, **kw)
        self.out_lp = torch.zeros(b, max_len, dtype=torch.float32, **kw)
        self.out_valid = torch.zeros(b, max_len, dtype=torch.bool, **kw)
        self.step = torch.zeros((), dtype=torch.long, **kw)
        self.temperature = torch.ones((), dtype=torch.float32, **kw)
        self.top_k = torch.zeros((), dtype=torch.long, **kw)
        self.top_p = torch.ones((), dtype=torch.float32, **kw)
        self.min_new = torch.zeros((), dtype=torch.long, **kw)
        self.pad = torch.zeros((), dtype=torch.long, **kw)
        self.eos_onehot = torch.zeros(vocab, dtype=torch.bool, **kw)


def _default_buckets(max_batch_size: int) -> tuple[int, ...]:
    sizes = {max_batch_size}
    s = 8
    while s < max_batch_size:
        sizes.add(s)
        s *= 2
    return tuple(sorted(sizes))


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return int(window)
