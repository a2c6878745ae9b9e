"""FSDP2 (``torch.distributed.fsdp.fully_shard``) wrapping for HF decoder models, and full state dicts.

Each decoder layer becomes its own FSDP unit (all-gathered just before it runs), then the root
module is wrapped so embeddings, final norm and heads are sharded too. Works for the families the
library supports, bare or under a ``*ForSequenceClassification`` / ``TokenValueModel`` / peft wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Attribute paths (from a base model) of the decoder-layer ModuleList, per family.
LAYER_PATHS: tuple[str, ...] = ("model.layers", "layers", "transformer.h", "h", "gpt_neox.layers")
#: Attribute names under which wrappers keep the wrapped model.
_WRAPPER_ATTRS: tuple[str, ...] = ("base_model", "model", "backbone", "pretrained_model", "module")


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (an FSDP2 / ``fully_shard`` model)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (``model.layers``, ``transformer.h``, ``gpt_neox.layers``).

    Searches the model, then models it wraps (seq-classification heads, value models, peft). Raises
    ``ValueError`` when no known layer list is found.
    """
    seen: set[int] = set()
    queue: list[nn.Module] = [model]
    while queue:
        m = queue.pop(0)
        if id(m) in seen:
            continue
        seen.add(id(m))
        for path in LAYER_PATHS:
            layers = _get_path(m, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
        for attr in _WRAPPER_ATTRS:
            child = getattr(m, attr, None)
            if isinstance(child, nn.Module):
                queue.append(child)
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}; looked for {', '.join(LAYER_PATHS)}"
    )


def apply_fsdp2(
    model: nn.Module,
    mesh: Any = None,
    mixed_precision: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer, then the root. Returns ``model``.

    ``mesh`` defaults to a 1-D mesh over all ranks on the device type of the model's parameters
    (so a CPU model shards over gloo even on a machine with GPUs); ``mixed_precision`` is
    a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params, fp32 reduce) or None.
    Needs an initialised process group.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if (
        mesh is None
    ):  # one data-parallel dimension on the device the model lives on (gloo on CPU, nccl on GPU)
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        first = next(model.parameters(), None)
        device_type = first.device.type if first is not None and first.device.type != "meta" else None
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw: dict[str, Any] = {"reshard_after_forward": reshard_after_forward, "mesh": mesh}
    kw["mp_policy"] = mixed_precision if mixed_precision is not None else MixedPrecisionPolicy()
    for layer in find_decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered, CPU full state dict of a (sharded or plain) model, for saving HF checkpoints.

    Collective for FSDP2 models: every rank must call it; rank 0 gets the tensors, others an empty dict.
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
