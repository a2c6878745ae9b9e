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

from rlhf_kit.generation.base import find_stop
from rlhf_kit.generation.sampling import _Flags

ATTN_IMPLEMENTATION = "rlhf_kit_static_kv"


_KV_ATTR = "_rlhf_kit_kv"  # attribute of an attention module holding its (k, v) buffers while a state lives


class _KVState:
    """Static KV buffers ``(max_batch, kv_heads, L, head_dim)`` of every attention layer, plus the write slot.

    Each layer's buffers live on its attention module (attribute ``_rlhf_kit_kv``), not in a table
    indexed by ``layer_idx``: compiled code then reads them as tensor inputs of the module, so one
    compiled transformer block serves every layer (a lookup by the layer's number would specialise
    the compiled block on that number and compile it once per layer). :meth:`release` removes them.
    """

    def __init__(self, max_batch: int, max_len: int, device: torch.device, decode_attention: str) -> None:
        self.max_batch = max_batch
        self.max_len = max_len
        self.decode_attention = decode_attention
        self.modules: list[nn.Module] = []
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)
        # each row's first prompt slot (its left padding before it is masked); the Triton kernel skips it
        self.row_start = torch.zeros(max_batch, dtype=torch.long, device=device)

    def buffers(self, module: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = module.__dict__.get(_KV_ATTR)
        if kv is None:  # first use in this state; the backend makes it happen eagerly, never in compiled code
            # zeros, not empty: masked slots are multiplied by 0 in P @ V, and 0 * NaN would be NaN
            shape = (self.max_batch, like.shape[1], self.max_len, like.shape[3])
            kv = (
                torch.zeros(shape, dtype=like.dtype, device=like.device),
                torch.zeros(shape, dtype=like.dtype, device=like.device),
            )
            setattr(module, _KV_ATTR, kv)
            self.modules.append(module)
        return kv

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules for t in m.__dict__.get(_KV_ATTR, ()))

    def release(self) -> None:
        """Drop the buffers from the modules (the memory is freed once nothing else holds them)."""
        for module in self.modules:
            module.__dict__.pop(_KV_ATTR, None)
        self.modules.clear()


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


DECODE_ATTENTION = ("auto", "triton", "matmul", "sdpa")


def resolve_decode_attention(how: str, device: torch.device, head_dim: int) -> str:
    """``"auto"``: the Triton kernel (:mod:`rlhf_kit.generation.decode_kernel`) on CUDA when Triton imports
    and the head size suits it, else ``"matmul"``. ``"triton"`` where it cannot run is refused; any other
    choice is returned as given."""
    from rlhf_kit.generation.decode_kernel import AVAILABLE, fits

    usable = AVAILABLE and fits(head_dim)
    if how == "auto":
        return "triton" if device.type == "cuda" and usable else "matmul"
    if how == "triton" and not usable:
        raise ValueError(f"decode_attention='triton' needs Triton and a power-of-two head size >= 16 "
                         f"(Triton imported: {AVAILABLE}; head size {head_dim})")  # fmt: skip
    return how


def grouped_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    how: str,
) -> torch.Tensor:
    """Attention of one new token per row over a static cache, heads grouped per KV head (GQA).

    ``query (b, kv, g, d)`` (``g = heads / kv_heads``), ``key``/``value (b, kv, L, d)``, ``mask`` additive,
    broadcastable to ``(b, 1, 1, L)``; returns ``(b, kv, g, d)``. Softmax in float32 in both variants:

    * ``"matmul"``: two batched matrix products (the scores rounded to the input dtype, as HF's eager
      attention does);
    * ``"sdpa"``: ``F.scaled_dot_product_attention`` (whatever kernel SDPA picks for a 2-query, masked call).
    """
    if how == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale  # (b, kv, g, L)
    if mask is not None:
        scores = scores + mask.float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)


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
    ``rotary=(cos, sin)`` (from :func:`rotary_in_kernel` callers only): query and key come unrotated and
    the Triton kernel rotates them.
    """
    rotary = kwargs.pop("rotary", None)
    state = _ACTIVE
    if rotary is not None and not rotary_in_kernel(query.shape[2]):
        raise RuntimeError("rotary=(cos, sin) is for the Triton decode step only (see rotary_in_kernel)")
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    k_all, v_all = state.buffers(module, key)  # (max_batch, kv, L, d)
    k_buf, v_buf = k_all[:b], v_all[:b]
    if q_len == 1:
        grouped = query.reshape(b, kv, h // kv, d)
        if state.decode_attention == "triton":  # one kernel: the cache write and the attention
            from rlhf_kit.generation.decode_kernel import decode_attention

            scale = d**-0.5 if scaling is None else scaling
            cos, sin = rotary if rotary is not None else (None, None)
            out = decode_attention(grouped, key, value, k_all, v_all, attention_mask, state.cache_pos, scale,
                                   state.row_start, cos, sin)  # fmt: skip
        else:
            k_buf.index_copy_(2, state.cache_pos, key)
            v_buf.index_copy_(2, state.cache_pos, value)
            out = grouped_decode_attention(
                grouped, k_buf, v_buf, attention_mask, scaling, state.decode_attention
            )
        return out.reshape(b, 1, h, d), None
    k_buf[:, :, :q_len].copy_(key)
    v_buf[:, :, :q_len].copy_(value)
    k, v = _repeat_kv(key, h // kv), _repeat_kv(value, h // kv)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def rotary_in_kernel(q_len: int) -> bool:
    """Whether a query of ``q_len`` tokens is a decode step of the Triton kernel, which then applies the
    rotary embedding itself (one kernel fewer per layer; the fused attention forward asks this)."""
    state = _ACTIVE
    return q_len == 1 and state is not None and state.decode_attention == "triton"


def prefill_inputs(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For left-padded prompts with ``mask (b, p)``: the additive causal mask ``(b, 1, p, p)`` in ``dtype``
    (padding columns hidden; a padding row sees itself, so no softmax row is empty) and ``position_ids
    (b, p)`` counted from each row's first token."""
    b, p = mask.shape
    valid = mask.bool()
    allowed = torch.ones(p, p, dtype=torch.bool, device=mask.device).tril()[None] & valid[:, None, :]
    allowed |= torch.eye(p, dtype=torch.bool, device=mask.device)[None]
    additive = torch.zeros(b, 1, p, p, dtype=dtype, device=mask.device)
    additive.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return additive, (mask.long().cumsum(-1) - 1).clamp(min=0)


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

    def mark_stopped(self, tokenizer: Any, n_rows: int, upto: int, stop_strings: Any) -> None:
        """Mark rows whose text in the first ``upto`` columns contains a stop string as finished (host side)."""
        toks = self.out_tok[:n_rows, :upto].cpu()
        valid = self.out_valid[:n_rows, :upto].cpu()
        done = self.finished[:n_rows].cpu()
        for i in range(n_rows):
            if (
                not done[i]
                and find_stop(tokenizer, toks[i, : int(valid[i].sum())].tolist(), stop_strings) is not None
            ):
                self.finished[i] = True

    def set_params(self, params: Any, eos: list[int], pad: int, vocab: int) -> _Flags:
        """Write ``params`` (a ``SamplingParams``) into the static tensors; return the flags that select
        which compiled variant (and captured graph) of the decode step runs."""
        self.temperature.fill_(params.temperature)
        self.top_k.fill_(params.top_k)
        self.top_p.fill_(params.top_p)
        self.min_new.fill_(params.min_new_tokens)
        self.pad.fill_(pad)
        self.eos_onehot.zero_()
        if eos:
            self.eos_onehot[torch.tensor([e for e in eos if e < vocab], dtype=torch.long)] = True
        return _Flags(
            greedy=params.greedy,
            top_k=params.top_k > 0 and not params.greedy,
            top_p=params.top_p < 1.0 and not params.greedy,
            min_new=params.min_new_tokens > 0 and bool(eos),
            eos=bool(eos),
        )


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
