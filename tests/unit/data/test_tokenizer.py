"""Tokenizers as real checkpoints ship them: pad tokens, end-of-turn tokens, chat-format comparisons."""

from __future__ import annotations

import pytest

from rlhf_kit.data import load_comparisons, load_prompts, tokenize_pairs, tokenize_prompts, tokenize_sft
from rlhf_kit.data.tokenizer import (
    end_of_turn_id,
    ensure_pad_token,
    load_tokenizer,
    response_end_id,
    stop_token_ids,
)
from rlhf_kit.tiny import IM_END, IM_START, train_chat_tokenizer


@pytest.fixture(scope="module")
def no_pad():
    return train_chat_tokenizer("none")  # SmolLM2 under transformers 5.17: no pad, EOS = <|im_start|>


@pytest.fixture(scope="module")
def pad_is_eos():
    return train_chat_tokenizer("eos")  # SmolLM2 under transformers 5.24: pad = EOS = <|im_end|>


def test_end_of_turn_is_found_from_the_chat_template(no_pad, pad_is_eos, tokenizer):
    im_end = no_pad.convert_tokens_to_ids(IM_END)
    assert no_pad.eos_token == IM_START  # the quirk: EOS is not what ends a turn
    assert end_of_turn_id(no_pad) == im_end == response_end_id(no_pad)
    assert stop_token_ids(no_pad) == [im_end, no_pad.eos_token_id]
    assert end_of_turn_id(pad_is_eos) == pad_is_eos.eos_token_id and stop_token_ids(pad_is_eos) == [im_end]
    # the tiny tokenizer's template closes turns with plain text: EOS ends responses
    assert end_of_turn_id(tokenizer) is None and response_end_id(tokenizer) == tokenizer.eos_token_id


def test_missing_pad_token_is_filled_with_eos(tmp_path):
    tok = train_chat_tokenizer("none")
    assert tok.pad_token_id is None
    assert "no pad token" in ensure_pad_token(tok) and tok.pad_token_id == tok.eos_token_id
    assert ensure_pad_token(tok) is None  # already has one: nothing done
    tok2 = train_chat_tokenizer("none")
    tok2.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert loaded.pad_token_id == loaded.eos_token_id and loaded.padding_side == "left"


def test_chat_comparisons_end_at_the_end_of_turn_token(no_pad, tmp_path):
    from rlhf_kit.data.hh import prepare_default_hh

    paths = prepare_default_hh(tmp_path, messages=True)
    pairs = load_comparisons(paths["test_comparisons"])[:20]
    prompts = load_prompts(paths["test_prompts"])[:20]
    assert isinstance(pairs[0][0], list) and pairs[0][0][-1]["role"] == "assistant"
    im_end = no_pad.convert_tokens_to_ids(IM_END)
    examples, report = tokenize_pairs(pairs, no_pad, max_length=4096)
    assert report.kept == 20
    for ex in examples:  # ends with <|im_end|> itself: no newline after it, no EOS appended
        for ids in (ex["chosen_input_ids"], ex["rejected_input_ids"]):
            assert ids[-1] == im_end and ids[-2] != im_end and no_pad.eos_token_id != ids[-1]
    # a prompt ends with the generation prompt, and is a prefix of its chosen sequence
    prompt_ids, _ = tokenize_prompts(prompts, no_pad, max_length=4096)
    assert no_pad.decode(prompt_ids[0]).endswith("<|im_start|>assistant\n")
    assert examples[0]["chosen_input_ids"][: len(prompt_ids[0])] == prompt_ids[0]
    # SFT on the chosen conversations: the loss ends on <|im_end|>, once
    sft, _ = tokenize_sft([c for c, _ in pairs], no_pad, max_length=4096)
    assert all(e["labels"][-1] == im_end and e["labels"][-2] != im_end for e in sft)


def test_download_and_process_writes_chat_messages(tmp_path):
    import sys

    sys.path.insert(0, "recipes")
    from download_and_process import Config, main

    text = main(Config(source="default", output_dir=tmp_path / "text"))
    chat = main(Config(source="default", output_dir=tmp_path / "chat", format="messages"))
    text_pairs, chat_pairs = (
        load_comparisons(text["train_comparisons"]),
        load_comparisons(chat["train_comparisons"]),
    )
    assert len(text_pairs) == len(chat_pairs) > 2000  # the same pairs kept
    first = chat_pairs[0][0]
    assert [m["role"] for m in first][:2] == ["user", "assistant"] and first[-1]["role"] == "assistant"
    assert text_pairs[0][0].endswith(first[-1]["content"])
    assert load_prompts(chat["test_prompts"])[0][-1]["role"] == "user"
