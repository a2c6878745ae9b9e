"""FP8 products in the backward pass only: the forward pass, and so every log-prob, stays as it was.

A training pass runs three products per linear layer: the output ``y = x W^T`` (forward), the input
gradient ``dx = dy W`` and the weight gradient ``dW = dy^T x`` (backward). FP8 tensor cores (Hopper, Ada)
run them about twice as fast as bf16, but FP8 in the forward pass changes what RLHF reads from it. On
SmolLM2-135M-Instruct over 32 HH dialogues (``bench/fp8_fidelity.py``, docs/training.md), torchao's FP8
training recipes moved each token's log-prob 0.19-0.20 nats on average from the fp32 model's (bf16: 0.035).
A PPO ratio, its clipping at 0.2, the KL to a bf16 reference and a sampler's log-probs would all see that
as policy change.

So here the forward product stays in the model's dtype, bit for bit, and only backward products use
FP8 (e4m3, one dynamic scale per tensor), through torchao's ``Float8Linear`` with per-product cast
settings:

* ``"weights"``: the weight gradient only. It sums over every token of the micro-batch, so rounding
  errors average out: on the same model, the block linears' gradients were 3.6% off the fp32 gradients
  (relative L2, mean over layers), against 3.0% for bf16. One third of the products of a training pass.
* ``"all"``: the input gradient as well (two thirds of the products). Its error flows down through the
  layers below: 7.4% (at most 16% in one layer).

Only the ``nn.Linear`` layers inside the transformer blocks are converted (not the LM head, the value or
score head, nor a layer whose sizes are not multiples of 16, which FP8 products need). The parameters
are the same objects and the state dict keys do not change, so optimizers, checkpoints and
``save_pretrained`` see a plain model. torchao is the optional ``[lowbit]`` extra; the products run on
CUDA devices of compute capability 8.9 or later, and on the CPU (slowly, for tests).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_kit.errors import ConfigError
from rlhf_kit.models.compile import decoder_blocks

#: ``fp8_backward`` settings: no FP8, FP8 weight gradients, FP8 weight and input gradients.
FP8_BACKWARD = ("off", "weights", "all")


def fp8_capable(device: torch.device | str) -> bool:
    """Whether ``device`` runs FP8 products: the CPU, or a CUDA device of compute capability >= 8.9."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_backward_config(mode: str):
    """torchao's ``Float8LinearConfig`` for ``mode`` (``"weights"`` or ``"all"``): the output product
    disabled (the layer's own dtype), the chosen backward products in e4m3 with tensorwise dynamic
    scales. A :class:`ConfigError` names the install when torchao is missing."""
    if mode not in FP8_BACKWARD[1:]:
        raise ValueError(f"fp8_backward must be one of {FP8_BACKWARD[1:]}, got {mode!r}")
    try:
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.config import CastConfig, ScalingType, e4m3_dtype
    except ImportError as e:
        raise ConfigError(f"--fp8-backward needs torchao: pip install 'rlhf-kit[lowbit]' ({e})") from e

    def cast(on: bool):
        return CastConfig(
            scaling_type=ScalingType.DYNAMIC if on else ScalingType.DISABLED, target_dtype=e4m3_dtype
        )

    dgrad = mode == "all"
    # torchao pairs the operands per product: output (input, weight), input gradient (grad_output,
    # weight_for_grad_input), weight gradient (input_for_grad_weight, grad_output_for_grad_weight)
    return Float8LinearConfig(
        cast_config_input=cast(False),
        cast_config_weight=cast(False),
        cast_config_grad_output=cast(dgrad),
        cast_config_weight_for_grad_input=cast(dgrad),
        cast_config_input_for_grad_weight=cast(True),
        cast_config_grad_output_for_grad_weight=cast(True),
    )


def convertible(layer: nn.Module) -> bool:
    """A plain ``nn.Linear`` whose input and output sizes are multiples of 16 (FP8 products need it)."""
    return type(layer) is nn.Linear and layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def convert_to_fp8_backward(model: nn.Module, mode: str) -> int:
    """Swap the linear layers of ``model``'s transformer blocks for torchao ``Float8Linear`` layers
    running the backward products of ``mode`` in FP8 (:func:`fp8_backward_config`); ``"off"`` does
    nothing. Returns the number of layers converted. Call it before ``torch.compile`` and sharding.

    Raises :class:`ConfigError` for a model with LoRA adapters (their layers are not plain linears) or
    with no convertible layer."""
    if mode == "off":
        return 0
    config = fp8_backward_config(mode)
    from torchao.float8 import convert_to_float8_training

    if any(type(m).__name__.startswith("Lora") or hasattr(m, "lora_A") for m in model.modules()):
        raise ConfigError(
            "--fp8-backward converts plain linear layers; LoRA's adapters are not (drop --lora-r)"
        )
    converted = 0
    for block in decoder_blocks(model):
        n = sum(convertible(m) for m in block.modules())
        if n:
            convert_to_float8_training(block, config=config, module_filter_fn=lambda m, fqn: convertible(m))
            converted += n
    if converted == 0:
        raise ConfigError(
            f"--fp8-backward: {type(model).__name__} has no linear layer with sizes divisible by 16 in its blocks"
        )
    return converted
