"""Models set up the way real checkpoints are: pad == EOS, no pad token, config and tokenizer pad ids that
differ, bf16 weights on disk, attention dropout in the config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf_kit.data import PairCollator
from rlhf_kit.models import disable_dropout, reward_scores
from rlhf_kit.models.heads import per_token_scores
from rlhf_kit.tiny import FAMILIES, save_real_like_checkpoint, tiny_config, train_chat_tokenizer
from rlhf_kit.training.evaluation import pair_scores
from rlhf_kit.training.hf import load_for_training


@pytest.fixture(scope="module")
def chat_tok():
    return train_chat_tokenizer("eos")


def _reward_model(vocab: int, config_pad: int | None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config("llama", vocab, num_labels=1, pad_token_id=config_pad, eos_token_id=2, bos_token_id=1)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _right_padded(tok, texts):
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask, [len(r) for r in ids]


@pytest.mark.parametrize(
    "config_pad", [2, 0, None], ids=["pad_is_eos", "config_pad_differs", "no_config_pad"]
)
def test_scores_are_read_at_the_last_real_token(chat_tok, config_pad):
    # the tokenizer pads with EOS (id 2); every row ends with EOS; the config says pad is 2, 0 or unset
    model = _reward_model(len(chat_tok), config_pad)
    ids, mask, lengths = _right_padded(
        chat_tok, ["Hello there, how are you?", "Hi", "A longer text than the others."]
    )
    scores = reward_scores(model, ids, mask)
    per_token = per_token_scores(model, ids, mask)
    expected = torch.stack([per_token[i, n - 1] for i, n in enumerate(lengths)])
    assert torch.allclose(scores, expected, atol=1e-6), (scores, expected)
    alone = torch.stack(
        [reward_scores(model, ids[i : i + 1, :n], mask[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
    )
    assert torch.allclose(scores, alone, atol=1e-5)  # padding changes nothing
    assert model.config.pad_token_id == config_pad  # the config is left as it was


def test_pair_scores_use_the_mask_not_the_config_pad_id(chat_tok):
    model = _reward_model(len(chat_tok), config_pad=0)  # SmolLM2's case: config and tokenizer disagree
    examples = [
        {"chosen_input_ids": chat_tok("good answer")["input_ids"] + [2], "rejected_input_ids": [5, 6, 2]},
        {
            "chosen_input_ids": [7, 2],
            "rejected_input_ids": chat_tok("a much longer bad answer")["input_ids"] + [2],
        },
    ]
    batch = PairCollator(chat_tok.pad_token_id)(examples)
    chosen, rejected = pair_scores(model, batch)
    for i, ex in enumerate(examples):
        for key, got in (("chosen_input_ids", chosen[i]), ("rejected_input_ids", rejected[i])):
            row = torch.tensor([ex[key]])
            assert torch.allclose(got, reward_scores(model, row, torch.ones_like(row))[0], atol=1e-5)


def test_bf16_checkpoint_trains_in_fp32_and_rewards_have_no_dropout(tmp_path):
    path = save_real_like_checkpoint(str(tmp_path / "m"))
    assert AutoModelForSequenceClassification.from_pretrained(path).dtype == torch.bfloat16  # as stored
    rm = load_for_training(path, "reward")
    lm = load_for_training(path, "causal_lm")
    assert {p.dtype for p in rm.parameters()} == {torch.float32} == {p.dtype for p in lm.parameters()}
    # small AdamW steps survive in fp32 (most of them round away in bf16)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    ids = torch.randint(3, 100, (2, 12))
    lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in lm.named_parameters())
    assert changed > 0.8 * sum(p.numel() for p in lm.parameters())
    rm.train()  # train mode, as in the training loop: scores must still be deterministic
    mask = torch.ones_like(ids)
    assert torch.equal(reward_scores(rm, ids, mask), reward_scores(rm, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_dropout_covers_attention_dropout_from_the_config(tokenizer, family):
    from transformers import AutoModelForCausalLM

    from rlhf_kit.tiny import tiny_config_for

    torch.manual_seed(0)
    config = tiny_config_for(tokenizer, family)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.3)
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(3, len(tokenizer), (2, 10))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is really on
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert all(
        not v
        for k, v in model.config.to_dict().items()
        if k.endswith(("dropout", "pdrop")) and isinstance(v, float)
    )
