import pytest

from rlhf_kit.data import (
    load_comparisons,
    load_comparisons_dataset,
    load_prompts,
    load_prompts_dataset,
    tokenize_pairs,
    tokenize_prompts,
    write_comparisons,
    write_prompts,
)

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, hh_processed):
    comparisons, prompts, _ = hh_processed
    d = tmp_path_factory.mktemp("hh_small")
    write_comparisons(d / "train_comparisons.jsonl", comparisons[:40])
    write_prompts(d / "train_prompts.jsonl", prompts[:40])
    write_comparisons(d / "test_comparisons.jsonl.gz", comparisons[40:50])
    return d


def test_file_matches_in_memory_path(tokenizer, small_dir, tmp_path):
    path = str(small_dir / "train_comparisons.jsonl")
    ds, report = load_comparisons_dataset(path, tokenizer, max_length=128, cache_dir=str(tmp_path))
    expected, expected_report = tokenize_pairs(load_comparisons(path), tokenizer, max_length=128)
    assert ds.column_names == ["chosen_input_ids", "rejected_input_ids"]
    assert [dict(r) for r in ds] == expected
    assert (report.total, report.kept, report.dropped) == (40, expected_report.kept, expected_report.dropped)
    assert report.dropped > 0  # HH dialogues exceed 128 tokens: the policy is exercised
    assert ds.cache_files  # tokenisation is cached on disk

    parallel, report2 = load_comparisons_dataset(
        path, tokenizer, 128, num_proc=2, too_long="truncate", cache_dir=str(tmp_path)
    )
    assert (len(parallel), report2.truncated, report2.dropped) == (40, expected_report.dropped, 0)


def test_folder_selects_split_and_kind(tokenizer, small_dir, tmp_path):
    ds, report = load_comparisons_dataset(
        str(small_dir), tokenizer, 4096, split="test", cache_dir=str(tmp_path)
    )
    assert (len(ds), report.dropped) == (10, 0)
    prompts, preport = load_prompts_dataset(
        str(small_dir), tokenizer, 32, split="train", cache_dir=str(tmp_path)
    )
    ids, n_truncated = tokenize_prompts(load_prompts(small_dir / "train_prompts.jsonl"), tokenizer, 32)
    assert list(prompts["input_ids"]) == ids and preport.truncated == n_truncated > 0
    with pytest.raises(ValueError, match="no comparisons files for split 'validation'"):
        load_comparisons_dataset(str(small_dir), tokenizer, 64, split="validation", cache_dir=str(tmp_path))


def test_pair_and_message_records(tokenizer, write_lines, tmp_path):
    path = write_lines(
        [
            {"prompt": MSG, "chosen": "yes", "rejected": "no"},
            {"prompt": MSG, "chosen": "ok", "rejected": "nah"},
        ]
    )
    ds, _ = load_comparisons_dataset(path, tokenizer, 64, cache_dir=str(tmp_path))
    assert tokenizer.decode(ds[0]["chosen_input_ids"][:-1]) == "User: hi\n\nAssistant: yes"


def test_dataset_errors(tokenizer, write_lines, tmp_path):
    cache = str(tmp_path / "cache")
    odd = write_lines([{"text": "a"}, {"text": "b"}, {"text": "c"}], "odd.jsonl")
    with pytest.raises(ValueError, match=r"record 3: odd number"):
        load_comparisons_dataset(odd, tokenizer, 64, cache_dir=cache)
    bad = write_lines([{"text": "a"}, {"text": "b"}, "{broken"], "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: line is not valid JSON"):
        load_comparisons_dataset(bad, tokenizer, 64, cache_dir=cache)
    wrong = write_lines([{"chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": 3}], "wrong.jsonl")
    with pytest.raises(ValueError, match=r"pair 2: field 'rejected' must be"):
        load_comparisons_dataset(wrong, tokenizer, 64, cache_dir=cache)
