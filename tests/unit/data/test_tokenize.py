import logging

import pytest
from tokenizers.processors import TemplateProcessing

from rlhf_kit.data import (
    IGNORE_INDEX,
    encode,
    encode_many,
    render,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_kit.tiny import hh_texts, train_tokenizer

MESSAGES = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Use flour."},
]


def test_render_uses_chat_template(tokenizer):
    assert render("plain text", tokenizer) == "plain text"
    assert render(MESSAGES, tokenizer) == "User: How do I bake bread?\n\nAssistant: Use flour."
    assert (
        render(MESSAGES[:1], tokenizer, add_generation_prompt=True)
        == "User: How do I bake bread?\n\nAssistant:"
    )


def test_encode_many_matches_encode_text_by_text():
    """One batched call per kind keeps the order and adds special tokens to plain strings only (a tokenizer
    that prepends BOS, as Llama's does, tells the two kinds apart)."""
    tok = train_tokenizer(hh_texts(200), vocab_size=400)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)]
    )
    texts = ["Human: hi", MESSAGES[:1], "Human: bread?\n\nAssistant: flour", MESSAGES, "x"]
    for gen in (False, True):
        want = [encode(t, tok, add_generation_prompt=gen) for t in texts]
        assert encode_many(texts, tok, add_generation_prompt=gen) == want
        assert [ids[0] == bos for ids in want] == [True, False, True, False, True]
    assert encode_many([], tok) == []


def test_render_without_template_is_an_error():
    tok = train_tokenizer(["User: hi\n\nAssistant: hello"] * 4, vocab_size=300, chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        render(MESSAGES, tok)


def test_pairs_get_eos_and_messages_match_strings(tokenizer):
    text = "User: How do I bake bread?\n\nAssistant: Use flour."
    examples, report = tokenize_pairs([(MESSAGES, text), (text, text + " Also")], tokenizer, max_length=512)
    eos = tokenizer.eos_token_id
    first = examples[0]
    assert first["chosen_input_ids"] == first["rejected_input_ids"]  # template render == the string
    assert first["chosen_input_ids"][-1] == eos and first["chosen_input_ids"].count(eos) == 1
    assert tokenizer.decode(first["chosen_input_ids"][:-1]) == text
    assert (report.total, report.kept, report.dropped, report.truncated) == (2, 2, 0, 0)


def _pairs(lengths):
    """Pairs whose chosen side is about the given number of tokens long."""
    return [("bread " * n, "no") for n in lengths]


def test_drop_and_truncate_are_counted(tokenizer, caplog):
    pairs = _pairs([2, 3, 40, 60])
    with caplog.at_level(logging.WARNING, logger="rlhf_kit.data"):
        kept, report = tokenize_pairs(pairs, tokenizer, max_length=16, too_long="drop")
    assert (report.kept, report.dropped, report.truncated) == (2, 2, 0)
    assert len(kept) == 2 and all(len(e["chosen_input_ids"]) <= 16 for e in kept)
    assert "dropped 2 (50.0%)" in str(report) and "dropped 2" in caplog.text

    cut, report = tokenize_pairs(pairs, tokenizer, max_length=16, too_long="truncate")
    assert (report.kept, report.dropped, report.truncated) == (4, 0, 2)
    assert [len(e["chosen_input_ids"]) for e in cut[2:]] == [16, 16]
    assert all(e["chosen_input_ids"][-1] == tokenizer.eos_token_id for e in cut)
    assert report.longest > 16
    with pytest.raises(ValueError, match="too_long"):
        tokenize_pairs(pairs, tokenizer, 16, too_long="skip")


def test_prompts_are_left_truncated(tokenizer):
    long_prompt = "User: " + "one two three " * 20 + "\n\nAssistant:"
    ids, n_truncated = tokenize_prompts([long_prompt, "User: hi\n\nAssistant:"], tokenizer, max_length=10)
    assert n_truncated == 1
    assert len(ids[0]) == 10 and tokenizer.decode(ids[0]).endswith("\n\nAssistant:")
    assert ids[0] == tokenizer(long_prompt)["input_ids"][-10:]
    assert tokenizer.decode(ids[1]) == "User: hi\n\nAssistant:"
    msg_ids, _ = tokenize_prompts([MESSAGES[:1]], tokenizer, max_length=64)
    assert tokenizer.decode(msg_ids[0]) == "User: How do I bake bread?\n\nAssistant:"


def test_sft_masks_prompt_tokens(tokenizer):
    text = "User: How do I bake bread?\n\nAssistant: Use flour."
    items = [text, ("User: How do I bake bread?\n\nAssistant:", " Use flour."), MESSAGES]
    examples, report = tokenize_sft(items, tokenizer, max_length=512)
    assert report.kept == 3
    assert examples[0] == examples[1] == examples[2]
    ex = examples[0]
    n_prompt = sum(label == IGNORE_INDEX for label in ex["labels"])
    assert tokenizer.decode(ex["input_ids"][:n_prompt]) == "User: How do I bake bread?\n\nAssistant:"
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"][n_prompt:-1]) == " Use flour."


def test_sft_length_policy(tokenizer):
    short = ("User: hi\n\nAssistant:", " " + "bread " * 30)
    only_prompt = ("User: " + "bread " * 40 + "\n\nAssistant:", " ok")
    examples, report = tokenize_sft([short, only_prompt], tokenizer, max_length=16, too_long="truncate")
    assert (report.kept, report.truncated, report.dropped) == (1, 1, 1)
    assert len(examples[0]["input_ids"]) == 16 and examples[0]["input_ids"][-1] != tokenizer.eos_token_id
    _, report = tokenize_sft([short, only_prompt], tokenizer, max_length=16, too_long="drop")
    assert (report.kept, report.dropped) == (0, 2)
    with pytest.raises(ValueError, match="response marker"):
        tokenize_sft(["no marker here"], tokenizer, 16)
