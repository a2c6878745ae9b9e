"""Attention-kernel choice for training forwards on left-padded batches.

PPO trains on ``(left-padded prompt + right-padded response)`` rows, so the query rows of the left
padding attend to nothing (every key is masked). PyTorch's cuDNN SDPA kernel computes a finite forward
for such rows but a NaN backward, which reaches every weight through the shared projections. On an
H100 with torch 2.11 it is the kernel SDPA picks by default for a masked bf16 forward with grad
(``bench/nan_probe.py``: 60 of 60 parameter grads non-finite with cuDNN or the default choice, none
with the memory-efficient, flash or math kernels). Training forwards therefore run under
:func:`padding_safe_sdpa`, which leaves every SDPA kernel but cuDNN's eligible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: SDPA kernels whose backward is finite on fully masked query rows.
PADDING_SAFE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@contextlib.contextmanager
def padding_safe_sdpa() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on any kernel but cuDNN's inside the block.

    Only ``torch.nn.functional.scaled_dot_product_attention`` is affected (HF's ``sdpa`` attention);
    eager and flash-attn-2 implementations ignore it. The choice also holds for the backward of the
    forwards made inside the block, since autograd replays the kernel the forward used.
    """
    with sdpa_kernel(list(PADDING_SAFE_SDPA_BACKENDS)):
        yield


def cudnn_sdpa_enabled() -> bool:
    """Whether SDPA may currently pick the cuDNN kernel (False inside :func:`padding_safe_sdpa`)."""
    return bool(torch.backends.cuda.cudnn_sdp_enabled())


#: transformers' SDPA attention, registered under this name without a mask function (:func:`maskless_causal`).
MASKLESS_IMPLEMENTATION = "rlhf_kit_causal"


@contextlib.contextmanager
def maskless_causal(model: torch.nn.Module, width: int) -> Iterator[None]:
    """For forwards of rows of up to ``width`` tokens without an attention mask, whose real tokens come
    first in every row (left-aligned or right-padded rows: causal attention alone is exact for them).

    transformers checks such a forward's position ids for packed sequences, a read of the device that
    makes the host wait for the GPU once per forward. While active, every config of ``model`` that names
    SDPA names :data:`MASKLESS_IMPLEMENTATION` instead: the same SDPA function, registered without a
    mask function, so no mask is built and nothing is read; attention stays SDPA's causal path. Models
    outside :data:`rlhf_kit.models.varlen.PACKED_MODEL_TYPES`, or with a sliding window shorter than
    ``width`` (whose SDPA path builds a window mask), are left as they are. A layer recomputed later
    under gradient checkpointing gets the same ``None`` mask and runs the same SDPA call."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from rlhf_kit.models.varlen import _configs, _implementation, unsupported_reason

    configs = {k: c for k, c in _configs(model).items() if getattr(c, "_attn_implementation", None) == "sdpa"}
    if not configs or unsupported_reason(model, width) is not None:
        yield
        return
    if MASKLESS_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(MASKLESS_IMPLEMENTATION, ALL_ATTENTION_FUNCTIONS["sdpa"])
    with _implementation(configs, MASKLESS_IMPLEMENTATION):
        yield
