import gzip
import json
import os

import pytest

from rlhf_kit.data import load_comparisons, load_prompts, write_comparisons, write_jsonl, write_prompts

MSG_PROMPT = [{"role": "user", "content": "hi"}]


def test_nemo_format_pairs_lines_in_order(write_lines):
    path = write_lines([{"text": "p1 good"}, {"text": "p1 bad"}, "", {"text": "p2 good"}, {"text": "p2 bad"}])
    assert load_comparisons(path) == [("p1 good", "p1 bad"), ("p2 good", "p2 bad")]


def test_prompt_chosen_rejected_strings_concatenate(write_lines):
    path = write_lines([{"prompt": "User: q\n\nAssistant:", "chosen": " yes", "rejected": " no"}])
    assert load_comparisons(path) == [("User: q\n\nAssistant: yes", "User: q\n\nAssistant: no")]


def test_message_formats(write_lines):
    full = {
        "chosen": MSG_PROMPT + [{"role": "assistant", "content": "a"}],
        "rejected": MSG_PROMPT + [{"role": "assistant", "content": "b"}],
    }
    split = {"prompt": MSG_PROMPT, "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}
    pairs = load_comparisons(write_lines([full, split]))
    assert pairs[0] == pairs[1] == (full["chosen"], full["rejected"])


def test_gzip_roundtrip_and_atomic_write(tmp_path):
    path = tmp_path / "out" / "c.jsonl.gz"
    assert write_comparisons(path, [("a", "b"), ("c", "d")]) == 2
    with gzip.open(path, "rt") as f:
        assert [json.loads(line)["text"] for line in f] == ["a", "b", "c", "d"]
    assert load_comparisons(path) == [("a", "b"), ("c", "d")]
    assert os.listdir(path.parent) == ["c.jsonl.gz"]  # no temp file left behind

    def failing():
        yield {"text": "x"}
        raise RuntimeError("boom")

    target = tmp_path / "out" / "p.jsonl"
    write_prompts(target, ["old"])
    with pytest.raises(RuntimeError):
        write_jsonl(target, failing())
    assert load_prompts(target) == ["old"]  # the old file is untouched
    assert sorted(os.listdir(target.parent)) == ["c.jsonl.gz", "p.jsonl"]


@pytest.mark.parametrize(
    "lines,pattern",
    [
        ([{"text": "a"}, "{oops", {"text": "b"}], r":2: line is not valid JSON"),
        ([{"text": "a"}, {"txt": "b"}], r":2: missing field 'text'"),
        ([{"text": "a"}, {"text": 3}], r":2: field 'text' must be a string"),
        ([{"text": "a"}, {"text": "b"}, {"text": "c"}], r":3: odd number of 'text' lines"),
        ([{"text": "a"}, {"chosen": "b", "rejected": "c"}], r":2: record shape differs"),
        ([{"chosen": "b"}], r":1: missing field 'rejected'"),
        (
            [{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "c"}],
            r":1: field 'chosen' message 0",
        ),
        (
            [{"prompt": "p", "chosen": MSG_PROMPT, "rejected": "c"}],
            r":1: field 'chosen' must be a string when",
        ),
        (["[1]"], r":1: expected a JSON object"),
        ([], r"empty file"),
        (["", "  "], r"empty file"),
    ],
)
def test_comparison_errors_name_file_and_line(write_lines, lines, pattern):
    path = write_lines(lines, name="bad.jsonl")
    with pytest.raises(ValueError, match=pattern) as e:
        load_comparisons(path)
    assert str(e.value).startswith(path)


def test_blank_lines_keep_line_numbers(write_lines):
    path = write_lines([{"text": "a"}, "", {"text": 1}], name="bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'text'"):
        load_comparisons(path)


def test_load_prompts_formats_and_errors(write_lines):
    assert load_prompts(write_lines([{"text": "User: a\n\nAssistant:"}], "t.jsonl")) == [
        "User: a\n\nAssistant:"
    ]
    assert load_prompts(write_lines([{"prompt": "b"}, {"prompt": MSG_PROMPT}], "p.jsonl")) == [
        "b",
        MSG_PROMPT,
    ]
    assert load_prompts(write_lines([{"messages": MSG_PROMPT}], "m.jsonl")) == [MSG_PROMPT]
    with pytest.raises(
        ValueError, match=r"mixed.jsonl:2: field 'prompt' differs .* field 'text' \(mixed formats\)"
    ):
        load_prompts(write_lines([{"text": "a"}, {"prompt": "b"}], "mixed.jsonl"))
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing field 'text'"):
        load_prompts(write_lines([{"text": "a"}, {"query": "b"}], "p.jsonl"))
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'text' must be a string"):
        load_prompts(write_lines([{"text": None}], "p.jsonl"))
    with pytest.raises(ValueError, match="empty file"):
        load_prompts(write_lines([], "p.jsonl"))


def test_unreadable_files_are_one_line_errors_naming_file_and_line(tmp_path, write_lines):
    from rlhf_kit.errors import DataError

    bad_utf8 = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in ("a", "b", "c")] + [b'{"text": "\xff\xfe"}']
    bad_utf8.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"bad.jsonl:4: line is not valid UTF-8"):
        load_prompts(bad_utf8)
    with pytest.raises(DataError, match=r"is a directory"):
        load_prompts(tmp_path)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:30])
    with pytest.raises(DataError, match=r"corrupt.jsonl.gz:\d+: cannot read the gzip stream"):
        load_prompts(corrupt)


def test_gzip_is_read_by_content_whatever_the_name(tmp_path):
    misnamed = tmp_path / "prompts.jsonl"  # gzip bytes under a plain name
    misnamed.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n'))
    assert load_prompts(misnamed) == ["a", "b"]


def test_empty_texts_and_unknown_roles_are_errors(write_lines):
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'text' is empty"):
        load_prompts(write_lines([{"text": "a"}, {"text": "  "}], "p.jsonl"))
    with pytest.raises(ValueError, match=r"c.jsonl:1: field 'rejected' is empty"):
        load_comparisons(write_lines([{"prompt": "p", "chosen": "a", "rejected": ""}], "c.jsonl"))
    msgs = [{"role": "System", "content": "hello"}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"m.jsonl:1: field 'messages' message 0 has role 'System'"):
        load_prompts(write_lines([{"messages": msgs}], "m.jsonl"))


def test_identical_pairs_are_dropped_counted_and_reported(write_lines, caplog):
    rows = [
        {"chosen": "x a", "rejected": "x b"},
        {"chosen": "x c", "rejected": "x c"},
        {"chosen": "d", "rejected": "e"},
    ]
    with caplog.at_level("WARNING", logger="rlhf_kit.data"):
        pairs = load_comparisons(write_lines(rows, "c.jsonl"))
    assert pairs == [("x a", "x b"), ("d", "e")]
    assert "dropped 1 of 3 pairs whose chosen is identical to rejected (line 2)" in caplog.text
    nemo = [{"text": "same"}, {"text": "same"}, {"text": "a"}, {"text": "b"}]
    assert load_comparisons(write_lines(nemo, "n.jsonl")) == [("a", "b")]
    with pytest.raises(ValueError, match=r"every pair has chosen identical to rejected \(line 1\)"):
        load_comparisons(write_lines(nemo[:2], "all.jsonl"))


def test_sft_records_are_checked_like_the_others():
    from rlhf_kit.data.formats import sft_item_from_record

    assert sft_item_from_record({"text": "a"}, "f:1") == "a"
    assert sft_item_from_record({"prompt": "p", "response": "r"}, "f:1") == ("p", "r")
    with pytest.raises(ValueError, match=r"f:3: field 'response' is empty"):
        sft_item_from_record({"prompt": "p", "response": ""}, "f:3")
    with pytest.raises(ValueError, match=r"f:4: field 'messages' message 0 has role 'tool'"):
        sft_item_from_record({"messages": [{"role": "tool", "content": "x"}]}, "f:4")
    with pytest.raises(ValueError, match=r"f:5: expected a string field 'text'"):
        sft_item_from_record({"other": 1}, "f:5")
