"""Regional ``torch.compile`` of an HF decoder: each transformer block compiled in place.

A PPO training step on a small model is launch-bound: eager HF blocks run a dozen separate kernels for
norm, rotary, SwiGLU and residual adds per layer, and the GPU idles between them (about a third of a
config-A step in the profile of docs/benchmarks.md). Compiling each block (not the whole model, as
torchtitan does) fuses those into a few kernels, compiles once for all identical blocks, keeps the
module tree and ``state_dict`` names unchanged (``nn.Module.compile``), and leaves embedding, head and
loss code eager, so varying batch shapes only recompile the block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhf_kit.models.heads import unwrap


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks of an HF decoder (``model.layers``, GPT-2's ``h``,
    GPT-NeoX's ``layers``...): the longest ``ModuleList`` in the module tree.

    Looks through PEFT, ``TokenValueModel`` and value-head wrappers.
    """
    best: nn.ModuleList | None = None
    for module in unwrap(model).modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None or len(best) == 0:
        raise ValueError(f"{type(model).__name__}: no ModuleList of transformer blocks found to compile")
    return best


#: Dynamo's recompile limit (entries per code object) that :func:`compile_blocks` ensures. Every block of
#: every model compiled here runs one code object, the decoder layer's ``forward``, so each variant that
#: PPO's four models call it with is an entry of the same cache: trained or frozen weights, with or without
#: gradients, a batch of rows or one packed row, its first shape and then a dynamic one: 12 entries in
#: three PPO steps on the CPU (tests/unit/models/test_compile.py). At Dynamo's default of 8, the variants
#: met after the limit ran eagerly, silently (``compile/limit_hits`` in the metrics counts such hits).
RECOMPILE_LIMIT = 64


def recompile_limit_setting() -> str:
    """The name of Dynamo's per-code-object recompile limit in ``torch._dynamo.config``:
    ``recompile_limit``, or ``cache_size_limit`` in older torch releases."""
    import torch._dynamo

    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise Dynamo's per-code-object recompile limit to at least ``limit`` (never lower it)."""
    import torch._dynamo

    cfg, name = torch._dynamo.config, recompile_limit_setting()
    setattr(cfg, name, max(getattr(cfg, name), limit))


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` every transformer block of ``model`` in place; returns the number compiled.

    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="aot_eager"`` on a machine without a
    compiler toolchain, ``dynamic=True`` when every batch has a new sequence length). Dynamo's recompile
    limit is raised to :data:`RECOMPILE_LIMIT` (:func:`allow_recompiles`): the blocks of all the models
    compiled share one cache.
    """
    blocks = decoder_blocks(model)
    allow_recompiles()
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def compile_edges(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` the small modules beside the blocks of ``model`` in place: the final norm and the
    rotary embedding (children of the blocks' parent whose class name has ``Norm`` or ends with
    ``RotaryEmbedding``, defined outside torch); returns their names.

    Eager, they are a kernel per operation: about 9 for Llama's rotary embedding and 7 for its RMSNorm
    in bf16, once per forward. That is nothing for a training pass over thousands of tokens, but a decode
    step runs them once per token (the compiled backend does this under ``compile_scope="blocks"``).
    """
    blocks = decoder_blocks(model)
    allow_recompiles()
    names = []
    for parent in unwrap(model).modules():
        if any(child is blocks for child in parent.children()):
            for name, child in parent.named_children():
                kind, home = type(child).__name__, type(child).__module__
                own = not home.startswith("torch.")  # torch's LayerNorm is one kernel (and Dynamo skips it)
                if own and ("Norm" in kind or kind.endswith("RotaryEmbedding")):
                    child.compile(**compile_kwargs)
                    names.append(name)
            break
    return names


def pdl_capable(device: torch.device) -> bool:
    """Can kernels on ``device`` be launched as programmatic dependent launches (CUDA compute capability 9,
    Hopper, and later)?"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def dependent_launch(device: torch.device, options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keyword arguments ``options`` with Inductor's programmatic dependent launch on, for
    a CUDA ``device`` of compute capability 9 (Hopper) or later: each generated Triton kernel may be launched
    while the one before it drains, and waits for that kernel's writes before its first dependent load.

    At a decode batch the step is a chain of short kernels, so the launch gap is a real part of it
    (docs/benchmarks.md, session 28). An ``options`` entry ``triton.enable_pdl`` of the caller's wins; with
    a ``mode`` (which ``torch.compile`` does not take together with ``options``), nothing is added.
    """
    from torch._inductor import config as inductor_config

    if "mode" in options or not hasattr(inductor_config.triton, "enable_pdl") or not pdl_capable(device):
        return options
    return {**options, "options": {"triton.enable_pdl": True, **options.get("options", {})}}
