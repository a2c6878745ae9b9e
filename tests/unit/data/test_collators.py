import torch

from rlhf_kit.data import (
    IGNORE_INDEX,
    PackedPairCollator,
    PackedSFTCollator,
    PairCollator,
    PromptCollator,
    SFTCollator,
    tokenize_sft,
)
from tests.conftest import make_causal_lm

PAIRS = [
    {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8]},
    {"chosen_input_ids": [9], "rejected_input_ids": [9, 10, 11, 12]},
]


def test_pair_collator_layout():
    batch = PairCollator(pad_token_id=0)(PAIRS)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0],
        [9, 0, 0, 0],
        [5, 8, 0, 0],
        [9, 10, 11, 12],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert PairCollator(0, pad_to_multiple_of=8)(PAIRS)["input_ids"].shape == (4, 8)


def test_packed_pair_collator_layout():
    batch = PackedPairCollator()(PAIRS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 5, 8, 9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1, 2, 3]]
    assert batch["last_index"].tolist() == [2, 3, 5, 9]
    assert "attention_mask" not in batch


def test_prompt_collator_left_pads():
    batch = PromptCollator(pad_token_id=0)([[3, 4, 5], {"input_ids": [6]}])
    assert batch["input_ids"].tolist() == [[3, 4, 5], [0, 0, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_sft_collators():
    examples = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
        {"input_ids": [5, 6], "labels": [-100, 6]},
    ]
    padded = SFTCollator(pad_token_id=0)(examples)
    assert padded["labels"].tolist() == [[-100, -100, 3, 4], [-100, 6, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    examples[1]["labels"] = [5, 6]  # even a labelled first token is masked at the boundary
    packed = PackedSFTCollator()(examples)
    assert packed["labels"].tolist() == [[-100, -100, 3, 4, IGNORE_INDEX, 6]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]


def test_packed_sft_loss_equals_padded(tokenizer):
    items = [
        ("User: hi\n\nAssistant:", " Hello there, friend."),
        ("User: how do I bake bread?\n\nAssistant:", " Flour, water, salt and time."),
        ("User: ok\n\nAssistant:", " Bye."),
    ]
    examples, _ = tokenize_sft(items, tokenizer, max_length=64)
    model = make_causal_lm(tokenizer, "llama")
    with torch.no_grad():
        padded = model(**SFTCollator(tokenizer.pad_token_id)(examples)).loss
        packed = model(**PackedSFTCollator()(examples), use_cache=False).loss
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
