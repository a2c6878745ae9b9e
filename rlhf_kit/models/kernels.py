"""Fused Triton kernels from `liger-kernel <https://github.com/linkedin/Liger-Kernel>`_ on a loaded model.

Liger replaces a model's RMSNorm, SwiGLU MLP and rotary embedding with fused kernels (fewer kernel
launches and fewer passes over activations, the same math). Only those three are applied here: the
language-model loss is not ours to fuse (reward models have no LM head; PPO computes log-probs with
:mod:`rlhf_kit.logprobs`). Liger needs Triton, so a CUDA machine; it is the optional ``[liger]`` extra.
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from rlhf_kit.errors import ConfigError
from rlhf_kit.models.heads import unwrap

#: What :func:`apply_liger_kernels` asks for (liger's keyword names; a family's function gets those it takes).
LIGER_PIECES = {
    "rms_norm": True,
    "swiglu": True,
    "rope": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


def _liger_functions() -> dict:
    """liger's ``model_type -> apply function`` table (a one-line :class:`ConfigError` with the install
    hint when liger-kernel or Triton is missing)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:  # liger or triton missing
        raise ConfigError(
            f"--liger-kernel needs liger-kernel (and Triton): pip install 'rlhf-kit[liger]' ({e})"
        ) from e
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_model_types() -> set[str]:
    """Model types liger-kernel knows (a one-line :class:`ConfigError` with the install hint when absent)."""
    return set(_liger_functions())


def apply_liger_kernels(model: nn.Module) -> str:
    """Swap liger's fused RMSNorm, SwiGLU and rotary kernels into ``model`` in place; returns its type.

    ``model`` is an HF model (a peft / DDP wrapper is unwrapped). Raises ``ValueError`` for a model type
    liger does not cover (:class:`ConfigError`), rather than silently leaving the model as it was.
    """
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    functions = _liger_functions()
    if model_type not in functions:
        raise ConfigError(f"liger-kernel has no kernels for model type {model_type!r}; drop --liger-kernel")
    fn = functions[model_type]
    accepted = inspect.signature(fn).parameters
    fn(model=base, **{k: v for k, v in LIGER_PIECES.items() if k in accepted})
    return model_type
