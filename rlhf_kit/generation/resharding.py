"""Training layout -> inference layout, streamed: gather FSDP2 shards bucket by bucket, merge LoRA on the
fly, rename to an engine's names, split for the engine's tensor parallelism.

Nothing here holds a second full copy of the model: :func:`iter_full_params` gathers at most
``bucket_bytes`` of full tensors at a time (one all-gather per bucket and dtype for FSDP2's dim-0
shards), yields them, and drops them before gathering the next bucket. Every rank of the FSDP group must
iterate the generator in step (the gathers are collectives).

Engine naming follows TensorRT-LLM's checkpoint layout for its Llama family (llama, mistral, qwen2):
``transformer.vocab_embedding``, ``transformer.layers.{i}.attention.qkv`` (q, k, v fused along the
output dim), ``attention.dense`` (o_proj), ``mlp.fc`` (gate_proj, the activated branch), ``mlp.gate``
(up_proj), ``mlp.proj`` (down_proj), ``input_layernorm``, ``post_layernorm``, ``transformer.ln_f``,
``lm_head``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf_kit.generation.base import _clean_name

#: Families whose HF weights map onto TensorRT-LLM's Llama checkpoint names.
ENGINE_FAMILIES = ("llama", "mistral", "qwen2")
#: Split kinds understood by :func:`tp_split`.
SPLIT_KINDS = ("column", "row", "qkv", "vocab", "replicate")

_PEFT_PREFIX = "base_model.model."
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


# ----------------------------------------------------------------------------------------------------
# streaming full parameters out of FSDP2 / peft models


@dataclass
class _Unit:
    """One output tensor: a plain parameter, or a LoRA-wrapped weight with its A and B."""

    name: str
    tensors: list[torch.Tensor]
    scaling: float = 0.0
    fan_in_fan_out: bool = False

    def full_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.element_size() for t in self.tensors)


def _hf_name(name: str) -> str:
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return _clean_name(name.replace(".base_layer.", "."))


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def _active_adapter(module: nn.Module, adapter: str | None) -> str | None:
    if adapter is not None:
        return adapter if adapter in module.lora_A else None
    active = getattr(module, "active_adapters", None) or [getattr(module, "active_adapter", "default")]
    active = [active] if isinstance(active, str) else list(active)
    names = [a for a in active if a in module.lora_A]
    if len(names) > 1:
        raise ValueError(f"several active LoRA adapters {names}; pass adapter= to choose one")
    return names[0] if names else None


def _units(model: nn.Module, adapter: str | None) -> list[_Unit]:
    modules = dict(model.named_modules())
    units: list[_Unit] = []
    for name, param in model.named_parameters():
        if any(part in name for part in _LORA_PARTS):
            continue  # merged into its base weight below
        owner = name.rsplit(".", 1)[0]
        if owner.endswith(".base_layer") and name.endswith(".weight"):
            lora = modules.get(owner[: -len(".base_layer")])
            if lora is not None and _is_lora_layer(lora):
                ad = _active_adapter(lora, adapter)
                if ad is not None and not getattr(lora, "merged", False):
                    a, b = lora.lora_A[ad].weight, lora.lora_B[ad].weight
                    units.append(
                        _Unit(
                            _hf_name(name),
                            [param, a, b],
                            scaling=float(lora.scaling[ad]),
                            fan_in_fan_out=bool(getattr(lora, "fan_in_fan_out", False)),
                        )
                    )
                    continue
        units.append(_Unit(_hf_name(name), [param]))
    return units


def _dim0_sharded(t: torch.Tensor) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout): gatherable in a flat bucket."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor) or t.device_mesh.ndim != 1 or len(t.placements) != 1:
        return False
    pl = t.placements[0]
    return isinstance(pl, Shard) and pl.dim == 0 and t.dim() >= 1


def _gather_dim0(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather several dim-0-sharded DTensors of one dtype and mesh with a single collective.

    FSDP2 shards like ``torch.chunk``: rank ``r`` holds rows ``[r*c, min((r+1)*c, n))`` with
    ``c = ceil(n / world)``; each local shard is padded to ``c`` rows, flattened and concatenated.
    """
    mesh = tensors[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    group = mesh.get_group()
    pieces, metas = [], []
    for t in tensors:
        full = tuple(t.shape)
        c = math.ceil(full[0] / world)
        rows_here = max(0, min(c, full[0] - rank * c))
        local = t.to_local()
        if local.shape[0] != rows_here:
            raise ValueError(f"unexpected FSDP2 shard of {full}: {tuple(local.shape)} rows on rank {rank}")
        padded = local.new_zeros((c, *full[1:]))
        padded[:rows_here] = local
        pieces.append(padded.reshape(-1))
        metas.append((full, c))
    flat = torch.cat(pieces)
    out = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=group)
    out = out.view(world, -1)
    result, offset = [], 0
    for full, c in metas:
        n = c * math.prod(full[1:])
        parts = out[:, offset : offset + n].reshape(world * c, *full[1:])
        result.append(parts[: full[0]].clone())
        offset += n
    return result


def _gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full (unsharded) versions of ``tensors``: batched dim-0 gathers per (dtype, mesh), else
    ``full_tensor()``, plain tensors as they are (detached)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if _dim0_sharded(t):
            groups.setdefault((t.dtype, id(t.device_mesh)), []).append(i)
        elif hasattr(t, "full_tensor"):
            out[i] = t.full_tensor().detach()
        else:
            out[i] = t.detach()
    for idx in groups.values():
        for i, full in zip(idx, _gather_dim0([tensors[i] for i in idx])):
            out[i] = full.detach()
    return out  # type: ignore[return-value]


def _materialise(unit: _Unit, full: list[torch.Tensor]) -> torch.Tensor:
    if len(full) == 1:
        return full[0]
    w, a, b = full
    delta = (b.float() @ a.float()) * unit.scaling
    if unit.fan_in_fan_out:
        delta = delta.T
    return (w.float() + delta).to(w.dtype)


@torch.no_grad()
def iter_full_params(
    model: nn.Module, bucket_bytes: int = 256 << 20, adapter: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for every parameter, gathering at most ``bucket_bytes`` at once.

    Works on plain models and FSDP2 (``fully_shard``) models, bare or under peft: LoRA layers come out
    merged (``W + B @ A * scaling``, transposed for ``fan_in_fan_out`` layers) under the plain HF name
    (``base_model.model.`` and ``.base_layer`` stripped, LoRA factors not yielded). Tied weights are
    yielded once (``named_parameters`` order). A unit bigger than the bucket is gathered alone.
    Collective: every rank must consume the generator in step.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[_Unit] = []
    size = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        flat = [t for u in bucket for t in u.tensors]
        full = _gather(flat)
        pos = 0
        for u in bucket:
            k = len(u.tensors)
            yield u.name, _materialise(u, full[pos : pos + k])
            pos += k

    for unit in _units(model, adapter):
        nbytes = unit.full_bytes()
        if bucket and size + nbytes > bucket_bytes:
            yield from flush()
            bucket, size = [], 0
        bucket.append(unit)
        size += nbytes
    if bucket:
        yield from flush()


# ----------------------------------------------------------------------------------------------------
# engine names and tensor-parallel splits


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_layernorm.weight",
    "self_attn.o_proj.weight": "attention.dense.weight",
    "self_attn.o_proj.bias": "attention.dense.bias",
    "mlp.gate_proj.weight": "mlp.fc.weight",
    "mlp.up_proj.weight": "mlp.gate.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_TOP_MAP = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def to_engine_names(name: str, family: str) -> str:
    """TensorRT-LLM checkpoint name of a HF parameter (q/k/v all map to the fused ``attention.qkv``).

    Raises ``ValueError`` for families other than :data:`ENGINE_FAMILIES` or names it does not know.
    """
    if family not in ENGINE_FAMILIES:
        raise ValueError(f"no engine naming for family {family!r}; supported: {ENGINE_FAMILIES}")
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER.match(name)
    if m:
        layer, rest = m.groups()
        q = _QKV.match(rest)
        if q:
            return f"transformer.layers.{layer}.attention.qkv.{q.group(2)}"
        if rest in _LAYER_MAP:
            return f"transformer.layers.{layer}.{_LAYER_MAP[rest]}"
    raise ValueError(f"no TensorRT-LLM name for HF parameter {name!r} ({family})")


def split_kind(engine_name: str) -> str:
    """How an engine tensor is split across TP ranks (one of :data:`SPLIT_KINDS`)."""
    if ".attention.qkv." in engine_name:
        return "qkv"
    if engine_name.endswith(("attention.dense.weight", "mlp.proj.weight")):
        return "row"
    if engine_name.endswith(("mlp.fc.weight", "mlp.gate.weight")):
        return "column"
    if engine_name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        return "vocab"
    return "replicate"


@dataclass(frozen=True)
class HeadLayout:
    """Attention head counts needed for fused-QKV splits."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> HeadLayout:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(heads, kv, head_dim)


def _chunk(t: torch.Tensor, rank: int, size: int, dim: int, what: str) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{what}: dim {dim} of size {t.shape[dim]} is not divisible by tp_size {size}")
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).contiguous()


def _kv_heads_of(rank: int, size: int, kv: int) -> tuple[int, int]:
    """(first kv head, count) of rank: split when ``kv % size == 0``, replicated when ``size % kv == 0``."""
    if kv % size == 0:
        return rank * (kv // size), kv // size
    if size % kv == 0:
        return rank // (size // kv), 1
    raise ValueError(f"{kv} KV heads can be neither split over nor replicated to tp_size {size}")


def split_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: HeadLayout, rank: int, size: int
) -> torch.Tensor:
    """Rank ``rank``'s fused QKV: its query heads, then its KV heads' keys and values, along dim 0.

    Works for weights ``(heads * head_dim, in)`` and biases ``(heads * head_dim,)``. With fewer KV heads
    than ranks (GQA), each KV head is replicated to ``size / kv`` consecutive ranks.
    """
    if heads.num_heads % size:
        raise ValueError(f"{heads.num_heads} query heads are not divisible by tp_size {size}")
    d = heads.head_dim
    per = heads.num_heads // size
    q_r = q[rank * per * d : (rank + 1) * per * d]
    first, count = _kv_heads_of(rank, size, heads.num_kv_heads)
    k_r = k[first * d : (first + count) * d]
    v_r = v[first * d : (first + count) * d]
    return torch.cat([q_r, k_r, v_r], dim=0).contiguous()


def tp_split(
    name: str,
    tensor: torch.Tensor,
    tp_rank: int,
    tp_size: int,
    kind: str,
    heads: HeadLayout | None = None,
) -> torch.Tensor:
    """Rank ``tp_rank``'s piece of ``tensor`` for a ``tp_size``-way tensor-parallel engine.

    Kinds: ``column`` (output dim 0: each rank computes a slice of the outputs), ``row`` (input dim 1: each
    rank takes a slice of the inputs, partial outputs are summed; biases and 1-D tensors stay whole),
    ``qkv`` (a fused ``cat(q, k, v)`` split per head, GQA-aware; needs ``heads``), ``vocab`` (rows of an
    embedding / LM head, zero-padded to a multiple of ``tp_size``), ``replicate``.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    if kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; expected one of {SPLIT_KINDS}")
    if tp_size == 1 or kind == "replicate":
        return tensor
    if kind == "column":
        return _chunk(tensor, tp_rank, tp_size, 0, name)
    if kind == "row":
        return tensor if tensor.dim() == 1 else _chunk(tensor, tp_rank, tp_size, 1, name)
    if kind == "vocab":
        pad = (-tensor.shape[0]) % tp_size
        if pad:
            tensor = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
        return _chunk(tensor, tp_rank, tp_size, 0, name)
    if heads is None:
        raise ValueError(f"{name}: a qkv split needs the head layout (heads=HeadLayout(...))")
    d = heads.head_dim
    nq, nkv = heads.num_heads * d, heads.num_kv_heads * d
    if tensor.shape[0] != nq + 2 * nkv:
        raise ValueError(f"{name}: fused qkv has {tensor.shape[0]} rows, expected {nq + 2 * nkv}")
    q, k, v = tensor.split([nq, nkv, nkv], dim=0)
    return split_qkv(q, k, v, heads, tp_rank, tp_size)


def reshard_for_tp(
    params: Iterable[tuple[str, torch.Tensor]],
    family: str,
    config: Any,
    tp_rank: int,
    tp_size: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(engine_name, shard)`` for one TP rank from a stream of ``(hf_name, full_tensor)``.

    q/k/v of a layer are held only until all three arrived, then fused per rank (rank's q heads, then its
    k and v heads). Everything else passes through renamed and split (see :func:`split_kind`).
    """
    heads = HeadLayout.from_config(config)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in params:
        engine = to_engine_names(name, family)
        kind = split_kind(engine)
        if kind != "qkv":
            yield engine, tp_split(engine, tensor, tp_rank, tp_size, kind)
            continue
        which = _QKV.match(_LAYER.match(name).group(2)).group(1)  # type: ignore[union-attr]
        slot = pending.setdefault(engine, {})
        slot[which] = tensor
        if len(slot) == 3:
            del pending[engine]
            yield engine, split_qkv(slot["q"], slot["k"], slot["v"], heads, tp_rank, tp_size)
    if pending:
        raise ValueError(f"incomplete q/k/v for {sorted(pending)}: the stream ended before all three arrived")
