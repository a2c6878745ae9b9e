"""Padding-free (packed) reward-model forward passes.

A packed batch (:class:`rlhf_kit.data.collators.PackedPairCollator`) is one row of concatenated
sequences with ``position_ids`` restarting per sequence and no attention mask. In transformers 5, when
the 2D attention mask is ``None`` and there is no KV cache, ``create_causal_mask`` detects the restarts
and builds a block-diagonal causal mask (sdpa, eager, flex), and flash attention switches to its
variable-length kernel; so each sequence sees only itself. Two things break this silently, and
:func:`packed_sequence_scores` guards both: passing an attention mask, and a KV cache (models create
one when ``use_cache`` is on, so the forward pass here always passes ``use_cache=False``).

``AutoModelForSequenceClassification`` picks each row's last non-pad token itself, which does not work
on a packed row; we therefore call the backbone for per-token hidden states and apply the score head at
``last_index``. Verified equal to the padded path (float32, 1e-5) for :data:`PACKING_MODEL_TYPES`.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_kit.models.heads import backbone_and_head, unwrap

#: Model types whose packed scores are tested against the padded path (tests/unit/data/test_packing.py).
PACKING_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")


def sequence_classifier_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(backbone, score_head)`` of a sequence-classification model of a family verified for packing.

    Raises ``ValueError`` for other families (see :data:`PACKING_MODEL_TYPES`); the parts themselves
    come from :func:`rlhf_kit.models.heads.backbone_and_head` (DDP / peft wrappers unwrapped).
    """
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    if model_type not in PACKING_MODEL_TYPES:
        raise ValueError(
            f"packed (padding-free) scoring is not supported for model type {model_type!r}; "
            f"supported: {', '.join(PACKING_MODEL_TYPES)}. Use the padded PairCollator instead."
        )
    return backbone_and_head(model)


def packed_hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token hidden states ``(1, T, h)`` of a packed batch (``input_ids``, ``position_ids``)."""
    if batch.get("attention_mask") is not None:
        raise ValueError(
            "a packed batch must not carry an attention_mask (it would disable per-sequence masking)"
        )
    if batch["input_ids"].shape[0] != 1 or batch["position_ids"].shape != batch["input_ids"].shape:
        raise ValueError("a packed batch has input_ids and position_ids of shape (1, T)")
    backbone, _ = sequence_classifier_parts(model)
    out = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state


def packed_sequence_scores(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reward-model scores ``(n,)`` of the sequences in a packed batch, read at ``last_index``.

    ``model`` is an ``AutoModelForSequenceClassification`` with ``num_labels=1`` (PEFT/DDP wrappers
    are unwrapped); ``batch`` comes from :class:`~rlhf_kit.data.collators.PackedPairCollator`, so the
    first half of the scores are the chosen sequences and the second half the rejected ones. Equals
    ``model(**padded_batch).logits[:, 0]`` for the same sequences.
    """
    _, head = sequence_classifier_parts(model)
    hidden = packed_hidden_states(model, batch)
    scores = head(hidden[0, batch["last_index"].to(hidden.device)])
    if scores.shape[-1] != 1:
        raise ValueError(f"expected a reward model with num_labels=1, got {scores.shape[-1]} labels")
    return scores[:, 0]
