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


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` every transformer block of ``model`` in place; returns the number compiled.

    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="aot_eager"`` on a machine without a
    compiler toolchain, ``dynamic=True`` when every batch has a new sequence length).
    """
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
