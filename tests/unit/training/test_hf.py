import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_kit.training.evaluation import count_label_tokens, evaluate_pairs, pair_scores
from rlhf_kit.training.hf import (
    LoraSettings,
    apply_lora,
    load_for_training,
    resolve_mixed_precision,
    save_hf_model,
)
from tests.conftest import make_causal_lm, make_reward_model


def _train_a_bit(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_lora_reward_model_exports_merged_with_trained_score_head(tokenizer, tmp_path):
    model = apply_lora(make_reward_model(tokenizer, "llama"), LoraSettings(r=4, alpha=8), "SEQ_CLS")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("score" in n and "lora" not in n for n in trainable)
    ids = torch.randint(3, len(tokenizer), (2, 7))
    _train_a_bit(model, ids)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_hf_model(model, tmp_path / "final", tokenizer, config_updates={"reward_mean": 0.5})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # training model untouched
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert loaded.config.reward_mean == 0.5 and not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
    assert (out / "tokenizer.json").is_file() and not (tmp_path / "final.tmp").exists()


def test_causal_lm_roundtrip_for_tied_family(tokenizer, tmp_path):
    model = make_causal_lm(tokenizer, "gpt2")  # gpt2 ties input and output embeddings
    ids = torch.randint(3, len(tokenizer), (2, 5))
    _train_a_bit(model, ids)
    save_hf_model(model, tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_for_training_reward_from_causal_lm_with_lora_and_checkpointing(tokenizer, tmp_path):
    make_causal_lm(tokenizer, "qwen2").save_pretrained(tmp_path / "lm")
    model = load_for_training(str(tmp_path / "lm"), "reward", LoraSettings(r=2), gradient_checkpointing=True)
    base = model.get_base_model()
    assert type(base).__name__ == "Qwen2ForSequenceClassification" and getattr(
        base, "is_activation_checkpointing", None
    )
    model.train()
    ids = torch.randint(3, len(tokenizer), (4, 6))
    chosen, rejected = pair_scores(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    (rejected - chosen).mean().backward()
    assert chosen.shape == (2,) and resolve_mixed_precision("no") == "no"


def test_evaluate_pairs_metrics(tokenizer):
    from rlhf_kit.data import PairCollator

    model = make_reward_model(tokenizer, "llama")
    examples = [{"chosen_input_ids": [5, 6, 7, 1], "rejected_input_ids": [5, 8, 1]} for _ in range(3)]
    examples.append({"chosen_input_ids": [9, 1], "rejected_input_ids": [10, 11, 12, 1]})
    m = evaluate_pairs(model, examples, PairCollator(tokenizer.pad_token_id), batch_size=3, device="cpu")
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        c, r = pair_scores(model, batch)
    assert m["num_pairs"] == 4 and abs(m["accuracy"] - (c > r).float().mean().item()) < 1e-9
    assert (
        abs(m["chosen_reward"] - c.mean().item()) < 1e-5
        and abs(m["reward_mean"] - torch.cat([c, r]).mean().item()) < 1e-5
    )
    assert abs(m["loss"] - torch.nn.functional.softplus(r - c).mean().item()) < 1e-5
    assert count_label_tokens(torch.tensor([[-100, 4, 5, -100], [-100, -100, 3, 1]])) == 4


def test_make_accelerator_keeps_sdpa_off_cudnn_unless_asked():
    from rlhf_kit.training.hf import make_accelerator

    make_accelerator("no", cudnn_attention=True)  # the switch is restored by tests/conftest.py
    assert torch.backends.cuda.cudnn_sdp_enabled()
    make_accelerator("no")  # the default: flash / memory-efficient attention only
    assert not torch.backends.cuda.cudnn_sdp_enabled()
