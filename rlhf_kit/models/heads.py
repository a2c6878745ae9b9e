"""Find the transformer backbone and the score head of an HF decoder model, whatever its family."""

from __future__ import annotations

import torch
import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model under DDP / accelerate (``.module``) and peft (``get_base_model``) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(backbone, score_head)`` of an ``AutoModelForSequenceClassification`` decoder model.

    The backbone returns hidden states ``(b, t, h)``; the head maps them to ``(b, t, num_labels)``.
    Works for every family whose sequence-classification class keeps its backbone under
    ``base_model_prefix`` and its head as ``score`` (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, ...),
    and through DDP and peft wrappers.
    """
    inner = unwrap(model)
    head = getattr(inner, "score", None)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if head is None or backbone is None or backbone is inner:
        raise ValueError(
            f"{type(inner).__name__} has no `score` head and backbone; rlhf_kit expects an HF "
            "AutoModelForSequenceClassification decoder (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, ...)"
        )
    return backbone, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(b, t)`` position ids counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(b,)`` index of the last real token in each row; works for left and right padding."""
    t = attention_mask.shape[-1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=-1).values.clamp(min=0)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row of ``attention_mask (b, t)`` is ones then zeros (no left or inner padding).

    One host sync on an accelerator (the mask is read back).
    """
    return not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())


def per_token_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **forward_kwargs,
) -> torch.Tensor:
    """Run backbone + score head at every position. Returns ``(b, t)`` float32 (first label).
    ``attention_mask=None``: every row's real tokens come first (causal attention alone is exact).
    ``forward_kwargs`` go to the backbone (a packed batch's ``cu_seq_lens_q``...)."""
    backbone, head = backbone_and_head(model)
    if position_ids is None and attention_mask is not None:
        position_ids = position_ids_from_mask(attention_mask)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **forward_kwargs,
    ).last_hidden_state
    # a copy, not a view: FSDP2 hooks the module output for backward and in-place ops on views drop it
    return head(hidden)[..., 0].float().clone()


#: Module attributes holding a dropout *probability* (read at forward time by HF attention code).
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "dropout_prob", "attn_pdrop")


def _is_dropout_field(name: str) -> bool:
    return name.endswith(("dropout", "pdrop", "dropout_prob", "dropout_rate")) and "layer" not in name


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch every dropout off, in ``nn.Dropout`` modules and where HF reads it from the config.

    PPO log-prob ratios, values and KL must not depend on dropout masks, and neither may a reward model's
    scores. Llama, Mistral, Qwen2 and GPT-NeoX attention layers keep ``attention_dropout`` as a float
    taken from the config (applied in train mode), not as a module, so those floats and every
    ``*dropout`` / ``*pdrop`` field of the configs are set to 0 too. Returns ``model``.
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if _is_dropout_field(name) and isinstance(value, float) and value:
                    setattr(config, name, 0.0)
    return model
