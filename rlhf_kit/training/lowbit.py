"""8-bit AdamW over bf16 weights (torchao), for when the optimizer state is what does not fit.

With fp32 master weights a trained parameter costs 18 bytes (bf16 weight 2, master 4, fp32 gradient 4,
AdamW moments 8: :mod:`rlhf_kit.training.precision`). Here it costs 6: the model holds bf16 weights and
bf16 gradients, and torchao's ``AdamW8bit`` keeps both moments block-wise quantised to 8 bits
(Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; blocks of 256 values, tensors
under 4096 values stay bf16). Each update is added to the bf16 weight with stochastic rounding
(Zamirai et al., 2020, "Revisiting BFloat16 Training"): a step smaller than the weight's bf16 spacing
still lands in expectation, which plain rounding to nearest would drop.

Costs, against fp32 masters: gradient accumulation over micro-batches happens in bf16, and the moments
carry 8-bit quantisation error. torchao compiles one small update function per parameter shape on the
first step (seconds on a GPU; about half a minute for a tiny model on CPU).

Checkpoints: the quantised moments travel in ``optimizer.state_dict()`` as torchao tensors that
``torch.load(weights_only=True)`` accepts (torchao registers them), so resume is exact. torchao is the
optional ``[lowbit]`` extra.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rlhf_kit.errors import ConfigError
from rlhf_kit.training.optim import param_groups


def adamw8bit_class():
    """torchao's ``AdamW8bit`` (a one-line :class:`ConfigError` with the install hint when it is missing)."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it names each prebuilt C++ kernel this torch cannot load (unused here)
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        raise ConfigError(f"--optimizer adamw8bit needs torchao: pip install 'rlhf-kit[lowbit]' ({e})") from e
    finally:
        quiet.setLevel(level)
    return AdamW8bit


def build_8bit_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Cast ``model``'s trainable parameters to bf16 and return torchao's ``AdamW8bit`` over them.

    Same parameter groups as :func:`rlhf_kit.training.optim.build_optimizer` (no decay on biases and
    norms); stochastic rounding of the bf16 update is on. Frozen parameters and buffers keep their dtype.
    The learning rate is a 0-d tensor in each group (torchao's convention; torch's schedulers fill it in
    place). Clip gradients on ``model`` itself: they live on its parameters.
    """
    adamw8bit = adamw8bit_class()
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("build_8bit_optimizer: no trainable parameters")
    for g in groups:
        for p in g["params"]:
            p.data = p.data.to(torch.bfloat16)
    return adamw8bit(
        groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bf16_stochastic_round=True
    )
