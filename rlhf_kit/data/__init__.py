"""Data: HH preparation, comparison/prompt formats, tokenisation, collators and sampling.

Everything between raw preference data and token batches for the reward-model, SFT and PPO recipes.
See ``docs/data.md`` for the formats and examples.
"""

from rlhf_kit.data.collators import (
    PackedPairCollator,
    PackedSFTCollator,
    PairCollator,
    PromptCollator,
    SFTCollator,
    pack,
    pad_left,
    pad_right,
)
from rlhf_kit.data.dataset import load_comparisons_dataset, load_prompts_dataset
from rlhf_kit.data.formats import (
    Text,
    iter_jsonl,
    load_comparisons,
    load_prompts,
    write_comparisons,
    write_jsonl,
    write_prompts,
)
from rlhf_kit.data.sampling import LengthGroupedSampler, hold_out, pair_lengths
from rlhf_kit.data.tokenize import (
    IGNORE_INDEX,
    TokenizeReport,
    encode,
    encode_many,
    render,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_kit.data.tokenizer import end_of_turn_id, load_tokenizer, stop_token_ids

__all__ = [
    "end_of_turn_id",
    "load_tokenizer",
    "stop_token_ids",
    "IGNORE_INDEX",
    "LengthGroupedSampler",
    "PackedPairCollator",
    "PackedSFTCollator",
    "PairCollator",
    "PromptCollator",
    "SFTCollator",
    "Text",
    "TokenizeReport",
    "encode",
    "encode_many",
    "hold_out",
    "iter_jsonl",
    "load_comparisons",
    "load_comparisons_dataset",
    "load_prompts",
    "load_prompts_dataset",
    "pack",
    "pad_left",
    "pad_right",
    "pair_lengths",
    "render",
    "tokenize_pairs",
    "tokenize_prompts",
    "tokenize_sft",
    "write_comparisons",
    "write_jsonl",
    "write_prompts",
]
