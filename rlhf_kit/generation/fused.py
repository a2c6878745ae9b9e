"""Fused projections for a generation backend's own inference copy of a Llama-family decoder.

A decode step at batch 64 is bound by how many kernels it launches, not by bytes: each projection is a
4-6 microsecond matrix product over a few MB of weights (the profile in docs/benchmarks.md). Llama,
Mistral and Qwen2 blocks run seven of them (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``);
with the query, key and value weights stacked into one matrix, and gate and up into another, they run
four. GPT-2 and GPT-NeoX already fuse their QKV projection.

The stacked matrices are the storage: each ``q_proj.weight`` (``k``, ``v``, ``gate``, ``up``) becomes a
view of its block, so parameter names, ``state_dict`` keys and in-place weight updates
(:func:`~rlhf_kit.generation.base.load_weights_`) are unchanged; the stacked tensors are non-persistent
buffers. Each fused module is checked against its unfused forward on a random input before it is
kept, so a transformers release that changes these modules falls back to the unfused path.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_kit.generation.static_cache import rotary_in_kernel, static_kv_attention

logger = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")


def _stack(module: nn.Module, names: tuple[str, ...], buffer: str) -> None:
    """Stack the named linears' weights (and biases) into ``module.<buffer>`` and make each a view of it."""
    linears = [getattr(module, n) for n in names]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    module.register_buffer(buffer, weight, persistent=False)
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    module.register_buffer(buffer + "_bias", bias, persistent=False)
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    module._rlhf_kit_split = [lin.weight.shape[0] for lin in linears]


def _fused_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The Llama-family attention forward with one QKV product (no KV-cache object: the backend's static
    cache lives in its attention function)."""
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    qkv = F.linear(hidden_states, self._rlhf_kit_qkv, self._rlhf_kit_qkv_bias)
    q, k, v = (t.view(shape).transpose(1, 2) for t in qkv.split(self._rlhf_kit_split, dim=-1))
    cos, sin = position_embeddings
    for name in ("past_key_values", "cache", "use_cache", "cache_position", "position_ids"):
        kwargs.pop(name, None)
    if self._rlhf_kit_plain_rotary and rotary_in_kernel(q.shape[2]):
        kwargs["rotary"] = (cos, sin)  # the Triton decode kernel rotates query and key itself
    else:
        q, k = self._rlhf_kit_rotary(q, k, cos, sin)
    out, weights = self._rlhf_kit_attention(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, self._rlhf_kit_gate_up, self._rlhf_kit_gate_up_bias).split(
        self._rlhf_kit_split, -1
    )
    return self.down_proj(self.act_fn(gate) * up)


def _stackable(m: nn.Module, names: tuple[str, ...]) -> bool:
    """Plain linears (not sharded DTensors) that all have a bias or none has."""
    linears = [getattr(m, n, None) for n in names]
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        return False
    plain = not any(hasattr(lin.weight, "device_mesh") for lin in linears)
    return plain and len({lin.bias is None for lin in linears}) == 1


def _is_llama_attention(m: nn.Module) -> bool:
    return (
        _stackable(m, _ATTN) and isinstance(getattr(m, "o_proj", None), nn.Linear) and hasattr(m, "head_dim")
    )


def _is_llama_mlp(m: nn.Module) -> bool:
    return (
        _stackable(m, _MLP) and isinstance(getattr(m, "down_proj", None), nn.Linear) and hasattr(m, "act_fn")
    )


def _self_check(module: nn.Module, fused: Any, args: tuple, kwargs: dict) -> bool:
    """Does the fused forward give the unfused one's output (to the input dtype's rounding)?"""
    with torch.no_grad():
        want = type(module).forward(module, *args, **kwargs)
        got = fused(module, *args, **kwargs)
    want, got = (t[0] if isinstance(t, tuple) else t for t in (want, got))
    tol = 1e-4 if want.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(want.float(), got.float(), atol=tol, rtol=tol))


def _check_attention(module: nn.Module) -> bool:
    """The self-check of one attention module, outside generation (its attention function then is SDPA)."""
    w = module.q_proj.weight
    b, t, d = 2, 5, module.q_proj.in_features
    x = torch.randn(b, t, d, dtype=w.dtype, device=w.device)
    cos = torch.randn(b, t, module.head_dim, dtype=w.dtype, device=w.device)
    sin = torch.randn(b, t, module.head_dim, dtype=w.dtype, device=w.device)
    kwargs = {"position_embeddings": (cos, sin), "attention_mask": None}
    return _self_check(module, _fused_attention_forward, (x,), kwargs)


def _plain_rotary(rotary: Any, module: nn.Module) -> bool:
    """Is ``rotary(q, k, cos, sin)`` Llama's ``x cos + rotate_half(x) sin`` (which the Triton decode kernel
    can apply itself)? Checked on random float32 inputs of one decode step."""
    d, half = module.head_dim, module.head_dim // 2
    q, k = torch.randn(2, 3, 1, d), torch.randn(2, 1, 1, d)
    cos, sin = torch.randn(2, 1, d), torch.randn(2, 1, d)

    def ref(x: torch.Tensor) -> torch.Tensor:
        return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]

    try:
        got = rotary(q, k, cos, sin)
    except Exception:  # noqa: BLE001 -- any other signature is simply not the plain convention
        return False
    return all(torch.allclose(a, ref(x), atol=1e-5) for a, x in zip(got, (q, k)))


def _check_mlp(module: nn.Module) -> bool:
    """The self-check of one MLP module."""
    w = module.gate_proj.weight
    x = torch.randn(2, 3, module.gate_proj.in_features, dtype=w.dtype, device=w.device)
    return _self_check(module, _fused_mlp_forward, (x,), {})


def fuse_projections(model: nn.Module, attention_fn: Any) -> int:
    """Stack QKV and gate/up projections of every Llama-family block of ``model`` in place; returns the
    number of modules fused (0 for families without those modules; it stops at the first module whose
    self-check fails, leaving that one and the rest unfused).

    ``attention_fn`` is the HF attention-interface function the fused attention calls (the backend's
    static-cache attention). Only for an inference copy: the stacked tensors are not trained.
    """
    fused = 0
    for module in list(model.modules()):
        if _is_llama_attention(module):
            rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
            if rotary is None:
                continue
            module._rlhf_kit_rotary, module._rlhf_kit_attention = rotary, attention_fn
            module._rlhf_kit_plain_rotary = attention_fn is static_kv_attention and _plain_rotary(
                rotary, module
            )
            _stack(module, _ATTN, "_rlhf_kit_qkv")
            if not _check_attention(module):  # the blocks fused so far passed their own checks and stay fused
                logger.warning(
                    "%s: fused QKV does not match its forward; kept unfused", type(module).__name__
                )
                return fused
            module.forward = types.MethodType(_fused_attention_forward, module)
            fused += 1
        elif _is_llama_mlp(module):
            _stack(module, _MLP, "_rlhf_kit_gate_up")
            if not _check_mlp(module):
                logger.warning(
                    "%s: fused gate/up does not match its forward; kept unfused", type(module).__name__
                )
                return fused
            module.forward = types.MethodType(_fused_mlp_forward, module)
            fused += 1
    return fused
