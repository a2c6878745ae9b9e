"""HF models in their RLHF roles: reward model, per-token critic, LM with a value head."""

from rlhf_kit.models.compile import compile_blocks
from rlhf_kit.models.heads import (
    backbone_and_head,
    disable_dropout,
    is_right_padded,
    last_token_index,
    per_token_scores,
    position_ids_from_mask,
)
from rlhf_kit.models.kernels import apply_liger_kernels
from rlhf_kit.models.packing import PACKING_MODEL_TYPES, packed_sequence_scores, sequence_classifier_parts
from rlhf_kit.models.reward import (
    load_reward_model,
    load_reward_stats,
    reward_scores,
    save_reward_stats,
)
from rlhf_kit.models.value import CausalLMWithValueHead, TokenValueModel, response_values
from rlhf_kit.models.varlen import packed_attention, packing, use_packed

__all__ = [
    "packed_attention",
    "packing",
    "use_packed",
    "apply_liger_kernels",
    "compile_blocks",
    "PACKING_MODEL_TYPES",
    "packed_sequence_scores",
    "sequence_classifier_parts",
    "CausalLMWithValueHead",
    "TokenValueModel",
    "backbone_and_head",
    "disable_dropout",
    "is_right_padded",
    "last_token_index",
    "load_reward_model",
    "load_reward_stats",
    "per_token_scores",
    "position_ids_from_mask",
    "response_values",
    "reward_scores",
    "save_reward_stats",
]
