"""Hugging Face models in training: accelerator set-up, loading with LoRA / gradient checkpointing,
and exporting the trained model as a standard HF directory (LoRA merged, FSDP2 shards gathered)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rlhf_kit.training import dist as D
from rlhf_kit.training.atomic import atomic_directory
from rlhf_kit.training.fsdp import full_state_dict, is_sharded
from rlhf_kit.training.guard import check_finite_on_all_ranks

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]


def resolve_mixed_precision(mixed_precision: MixedPrecision) -> str | None:
    """``"auto"``: the launcher's setting if any, else bf16 when the GPU supports it, else ``"no"``."""
    if mixed_precision != "auto":
        return mixed_precision
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # let accelerate read its config
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: MixedPrecision = "auto", cudnn_attention: bool = False):
    """An ``accelerate.Accelerator`` (one process, DDP or FSDP2 as launched) with resolved precision.

    ``cudnn_attention`` is the process-wide ``torch.backends.cuda.enable_cudnn_sdp`` switch. Off (the
    default), SDPA picks flash or memory-efficient attention; on an H200, cuDNN's kernel cost about 2 ms
    of host time per call, which made the reward-model step host-bound (docs/benchmarks.md).
    """
    from accelerate import Accelerator

    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision))


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). ``r=0`` means no LoRA: train all weights."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"


def apply_lora(model: nn.Module, lora: LoraSettings, task: Literal["SEQ_CLS", "CAUSAL_LM"]) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; for reward models the ``score`` head is trained in full."""
    from peft import LoraConfig, get_peft_model

    targets: Any = lora.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task,
        modules_to_save=["score"] if task == "SEQ_CLS" else None,
    )
    return get_peft_model(model, config)


def load_for_training(
    path: str,
    kind: Literal["reward", "causal_lm"],
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Load a reward model (sequence classification, 1 label) or a causal LM from ``path`` for training.

    Trainable weights are loaded in ``dtype``, float32 by default, whatever the checkpoint stores:
    transformers 5 keeps a checkpoint's dtype (hub checkpoints are bf16), and AdamW on bf16 weights
    rounds most small updates away (use ``--master-weights`` for bf16 weights with fp32 masters).
    ``dtype=None`` keeps the stored dtype. A causal-LM checkpoint loads as a reward model with a fresh
    ``score`` head. Reward models get dropout switched off (:func:`rlhf_kit.models.disable_dropout`,
    ``attention_dropout`` included), so pairs are scored deterministically. Optional gradient
    checkpointing (non-reentrant) and LoRA (see :func:`apply_lora`).
    """
    if kind == "reward":
        from rlhf_kit.models import disable_dropout
        from rlhf_kit.models.reward import load_reward_model

        model = disable_dropout(load_reward_model(path, torch_dtype=dtype))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None and lora.r > 0:
        model = apply_lora(model, lora, "SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / accelerate wrappers (``.module``); peft and FSDP2 models are kept."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
        model = model.module
    return model


def _rebuild_on_cpu(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain HF model (LoRA merged) holding ``state``, built on the meta device then filled in."""
    is_peft = hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    with torch.device("meta"):
        fresh = type(base)(base.config)
        if is_peft:
            from peft import get_peft_model

            fresh = get_peft_model(fresh, model.peft_config["default"])
    fresh.load_state_dict(state, strict=True, assign=True)
    if is_peft:
        fresh = fresh.merge_and_unload()
    for name, buf in list(fresh.named_buffers()):  # non-persistent buffers (e.g. rotary) are not saved
        if buf.is_meta:
            mod = fresh.get_submodule(name.rsplit(".", 1)[0]) if "." in name else fresh
            mod._buffers[name.rsplit(".", 1)[-1]] = torch.zeros(buf.shape, dtype=buf.dtype)
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh


def save_hf_model(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer: Any = None,
    config_updates: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a standard HF directory (``from_pretrained`` loads it), atomically.

    Gathers FSDP2 shards (collective: call on every rank), merges LoRA adapters, sets
    ``config_updates`` on the saved config and saves ``tokenizer`` alongside. The training model is not
    modified. Rank 0 writes a temporary sibling and renames it to ``output_dir``; a state with a
    NaN/inf tensor is refused (:class:`~rlhf_kit.errors.NonFiniteError`).
    """
    output_dir = Path(output_dir)
    inner = unwrap_model(model)
    state = full_state_dict(inner)
    check_finite_on_all_ranks(state, f"model {output_dir}")  # never a NaN model on disk
    if D.is_main_process():
        if not is_sharded(inner):  # the dict shares storage with the live model: merging must not touch it
            state = {k: v.clone() for k, v in state.items()}
        fresh = _rebuild_on_cpu(inner, state)
        for k, v in (config_updates or {}).items():
            setattr(fresh.config, k, v)
        with atomic_directory(output_dir, "model") as tmp:  # complete or absent, even if killed
            fresh.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    D.barrier()
    return output_dir
