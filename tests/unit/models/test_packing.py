import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from rlhf_kit.data import PackedPairCollator, PairCollator, tokenize_pairs
from rlhf_kit.models import PACKING_MODEL_TYPES, packed_sequence_scores, sequence_classifier_parts
from rlhf_kit.tiny import FAMILIES
from tests.conftest import make_reward_model


@pytest.fixture(scope="module")
def pair_examples(tokenizer, hh_processed):
    comparisons, _, _ = hh_processed
    examples, _ = tokenize_pairs(comparisons[:3], tokenizer, max_length=96, too_long="truncate")
    return examples


def test_all_tested_families_support_packing():
    assert set(FAMILIES) <= set(PACKING_MODEL_TYPES)


def test_packed_rewards_equal_padded(tokenizer, family, pair_examples):
    model = make_reward_model(tokenizer, family).float()
    padded = PairCollator(tokenizer.pad_token_id)(pair_examples)
    packed = PackedPairCollator()(pair_examples)
    with torch.no_grad():
        expected = model(**padded).logits[:, 0]
        got = packed_sequence_scores(model, packed)
    assert got.shape == (2 * len(pair_examples),)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_packed_rewards_differ_without_the_packed_mask(tokenizer, pair_examples):
    """Guard against a vacuous pass: with one running position range, sequences would see each other."""
    model = make_reward_model(tokenizer, "llama").float()
    packed = PackedPairCollator()(pair_examples)
    backbone, head = sequence_classifier_parts(model)
    with torch.no_grad():
        mixed = head(backbone(input_ids=packed["input_ids"], use_cache=False).last_hidden_state)[0, :, 0]
        good = packed_sequence_scores(model, packed)
    assert not torch.allclose(mixed[packed["last_index"]][1:], good[1:], atol=1e-3)


def test_packed_scores_backpropagate(tokenizer, pair_examples):
    model = make_reward_model(tokenizer, "gpt2").float().train()
    scores = packed_sequence_scores(model, PackedPairCollator()(pair_examples))
    scores.sum().backward()
    assert model.score.weight.grad is not None and model.transformer.wte.weight.grad.abs().sum() > 0


def test_unsupported_family_and_bad_batches(tokenizer, pair_examples):
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    batch = PackedPairCollator()(pair_examples)
    with pytest.raises(ValueError, match="not supported for model type 'bert'"):
        packed_sequence_scores(bert, batch)
    model = make_reward_model(tokenizer, "llama")
    with pytest.raises(ValueError, match="attention_mask"):
        packed_sequence_scores(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
