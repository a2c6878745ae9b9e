import gzip
import json
import re

import pytest

from rlhf_kit import default_hh_file
from rlhf_kit.data import load_comparisons, load_prompts
from rlhf_kit.data.hh import (
    MalformedDialogue,
    convert_dialogue,
    convert_pair,
    prepare_default_hh,
    process_hh_file,
    split_prompt_response,
)

RAW = "\n\nHuman: hi there\n\nAssistant:  Hello!  \n\nHuman: how are you?\n\nAssistant: Fine, thanks.\n\nOk."


def test_split_prompt_response_keeps_text():
    prompt, response = split_prompt_response(RAW)
    assert prompt + response == RAW
    assert prompt.endswith("\n\nAssistant:") and response == " Fine, thanks.\n\nOk."
    with pytest.raises(MalformedDialogue):
        split_prompt_response("\n\nHuman: no answer")


def test_convert_dialogue_user_format():
    prompt, response = convert_dialogue(RAW)
    assert prompt == "User: hi there\n\nAssistant: Hello!\n\nUser: how are you?\n\nAssistant:"
    assert response == " Fine, thanks.\n\nOk."  # blank lines inside a turn are kept
    prompt_h, _ = convert_dialogue(RAW, keep_human=True)
    assert prompt_h == prompt.replace("User:", "Human:")


def test_converted_prompt_equals_chat_template(tokenizer):
    prompt, response = convert_dialogue(RAW)
    messages = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "how are you?"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt


@pytest.mark.parametrize(
    "chosen,rejected,reason",
    [
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: x\n\nAssistant: c", "prompt_mismatch"),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant:  b ", "identical_responses"),
        ("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: c", "empty_response"),
        ("\n\nHuman: a", "\n\nHuman: a\n\nAssistant: c", "no_assistant_turn"),
        ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "\n\nHuman: a\n\nAssistant: c", "not_alternating"),
        ("\n\nHuman: \n\nAssistant: b", "\n\nHuman: \n\nAssistant: c", "empty_turn"),
        (None, "\n\nHuman: a\n\nAssistant: c", "bad_record"),
    ],
)
def test_convert_pair_drop_reasons(chosen, rejected, reason):
    with pytest.raises(MalformedDialogue) as e:
        convert_pair(chosen, rejected)
    assert e.value.reason == reason


def test_process_file_counts_bad_lines(write_lines):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = write_lines([json.dumps(good), "{not json", json.dumps({"chosen": "x"}), "[1, 2]", ""])
    comparisons, prompts, counts = process_hh_file(path)
    assert comparisons == [("User: a\n\nAssistant: b", "User: a\n\nAssistant: c")]
    assert prompts == ["User: a\n\nAssistant:"]
    assert (counts.total, counts.kept, counts.dropped["bad_record"]) == (4, 1, 3)
    assert "bad_record: 3" in str(counts)


def test_shipped_file_end_to_end(hh_processed):
    comparisons, prompts, counts = hh_processed
    assert counts.total == 2312
    assert counts.kept == len(comparisons) == len(prompts) == 2299
    assert dict(counts.dropped) == {"not_alternating": 9, "empty_response": 4}
    turn = re.compile(r"(?:^|\n\n)(User|Assistant|Human):")
    for (chosen, rejected), prompt in zip(comparisons, prompts):
        assert prompt.startswith("User: ") and prompt.endswith("\n\nAssistant:")
        assert chosen.startswith(prompt + " ") and rejected.startswith(prompt + " ")
        assert chosen != rejected
        assert "Human" not in turn.findall(chosen) and "Human" not in turn.findall(rejected)
        assert "<|" not in chosen  # no special tokens in the text


def test_shipped_file_keeps_file_order_and_sides(hh_processed):
    comparisons, _, _ = hh_processed
    with gzip.open(default_hh_file(), "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    kept = []
    for row in raw:
        try:
            convert_pair(row["chosen"], row["rejected"])
        except MalformedDialogue:
            continue
        kept.append(row)
    assert len(kept) == len(comparisons)
    for row, (chosen, rejected) in zip(kept, comparisons):
        assert chosen.endswith(" " + split_prompt_response(row["chosen"])[1].strip())
        assert rejected.endswith(" " + split_prompt_response(row["rejected"])[1].strip())


def test_prepare_default_hh_is_deterministic(tmp_path):
    a = prepare_default_hh(tmp_path / "a", test_fraction=0.1, seed=0)
    b = prepare_default_hh(tmp_path / "b", test_fraction=0.1, seed=0)
    assert set(a) == {"train_comparisons", "train_prompts", "test_comparisons", "test_prompts"}
    for key in a:
        assert open(a[key], "rb").read() == open(b[key], "rb").read()
    train, test = load_comparisons(a["train_comparisons"]), load_comparisons(a["test_comparisons"])
    assert (len(train), len(test)) == (2069, 230)
    assert not set(train) & set(test)
    assert len(load_prompts(a["test_prompts"])) == 230
    c = prepare_default_hh(tmp_path / "c", test_fraction=0.1, seed=1)
    assert load_comparisons(c["test_comparisons"]) != test
    with pytest.raises(ValueError, match="test_fraction"):
        prepare_default_hh(tmp_path / "d", test_fraction=1.0)
