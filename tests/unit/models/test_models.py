import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_kit.models import (
    CausalLMWithValueHead,
    TokenValueModel,
    backbone_and_head,
    is_right_padded,
    last_token_index,
    load_reward_model,
    load_reward_stats,
    response_values,
    reward_scores,
    save_reward_stats,
)
from tests.conftest import make_causal_lm, make_reward_model


def _batch(tokenizer, texts, side):
    tokenizer.padding_side = side
    try:
        return tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"


def test_last_token_index_left_and_right():
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [1, 3, 3]


def test_reward_scores_same_for_left_and_right_padding_and_unpadded(tokenizer, family):
    rm = make_reward_model(tokenizer, family)
    texts = ["User: hi\n\nAssistant: hello there friend", "User: what?"]
    right = _batch(tokenizer, texts, "right")
    left = _batch(tokenizer, texts, "left")
    with torch.no_grad():
        s_right = reward_scores(rm, right.input_ids, right.attention_mask)
        s_left = reward_scores(rm, left.input_ids, left.attention_mask)
        single = torch.stack([rm(**tokenizer([t], return_tensors="pt")).logits[0, 0] for t in texts])
    torch.testing.assert_close(s_right, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_left, single, atol=1e-5, rtol=1e-5)


def test_is_right_padded():
    assert is_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 0], [0, 1, 1]]))  # a left-padded row
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole


def test_right_padded_scores_run_maskless_and_equal_the_masked_forward(tokenizer, family):
    rm = make_reward_model(tokenizer, family)
    backbone, head = backbone_and_head(rm)
    masks: list = []
    backbone.register_forward_pre_hook(
        lambda _m, _a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True
    )
    texts = ["User: hi\n\nAssistant: hello there friend, how are you", "User: what?", "User: a b c"]
    right, left = _batch(tokenizer, texts, "right"), _batch(tokenizer, texts, "left")
    with torch.no_grad():
        fast = reward_scores(rm, right.input_ids, right.attention_mask)
        assert masks[-1] is None  # the causal kernel, no padding mask built
        from_left = reward_scores(rm, left.input_ids, left.attention_mask)
        assert masks[-1] is None  # left-padded rows are moved to the front: no mask either
        holes = left.attention_mask.clone()
        holes[0, -3] = 0  # padding inside a row: only the mask can keep it out
        reward_scores(rm, left.input_ids, holes)
        assert masks[-1] is not None
        seen: list = []
        head.register_forward_hook(lambda _m, _i, out: seen.append(out))
        rm(input_ids=right.input_ids, attention_mask=right.attention_mask)  # the masked forward
        masked = seen[-1][torch.arange(3), right.attention_mask.sum(-1) - 1, 0]
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_left, masked, atol=1e-5, rtol=1e-5)


def test_token_value_model_is_rm_head_per_token_and_roundtrips(tokenizer, family, tmp_path):
    rm = make_reward_model(tokenizer, family)
    critic = TokenValueModel(rm)
    enc = _batch(tokenizer, ["User: a longer prompt here\n\nAssistant: ok", "User: b"], "left")
    with torch.no_grad():
        values = critic(enc.input_ids, enc.attention_mask)
        scores = reward_scores(rm, enc.input_ids, enc.attention_mask)
    assert values.shape == enc.input_ids.shape and values.dtype == torch.float32
    torch.testing.assert_close(values[:, -1], scores)  # left padded: last column is the last token
    critic.save_pretrained(tmp_path / "critic")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic")
    with torch.no_grad():
        torch.testing.assert_close(TokenValueModel(loaded)(enc.input_ids, enc.attention_mask), values)
    v = response_values(critic, enc.input_ids, enc.attention_mask, prompt_length=3)
    assert v.shape == (2, enc.input_ids.shape[1] - 3)
    torch.testing.assert_close(v, values[:, 2:-1] * enc.attention_mask[:, 3:])  # 0 on padding


def test_value_gradients_reach_backbone(tokenizer):
    critic = TokenValueModel(make_reward_model(tokenizer, "llama"))
    ids = torch.randint(3, 500, (2, 6))
    critic(ids, torch.ones_like(ids)).sum().backward()
    assert critic.model.score.weight.grad is not None
    assert critic.model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_causal_lm_with_value_head_roundtrip(tokenizer, family, tmp_path):
    torch.manual_seed(0)
    model = CausalLMWithValueHead(make_causal_lm(tokenizer, family))
    ids = torch.randint(3, 500, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, values = model(ids, mask)
        plain = model.lm(input_ids=ids).logits
    assert logits.shape == (2, 7, len(tokenizer)) and values.shape == (2, 7)
    torch.testing.assert_close(logits, plain)
    model.save_pretrained(tmp_path / "m")
    again = CausalLMWithValueHead.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask)[1], values)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m") is not None


def test_load_reward_model_and_stats(tokenizer, tmp_path):
    make_reward_model(tokenizer).save_pretrained(tmp_path / "rm")
    save_reward_stats(str(tmp_path / "rm"), 0.5, 2.0, n=10)
    rm = load_reward_model(str(tmp_path / "rm"))
    assert rm.config.num_labels == 1
    assert load_reward_stats(str(tmp_path / "rm")) == {"mean": 0.5, "std": 2.0, "n": 10}
    assert load_reward_stats(str(tmp_path)) is None
