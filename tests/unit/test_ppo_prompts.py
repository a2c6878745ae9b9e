"""PPO's prompt sets: validation prompts held out of the training file when no --val-prompts is given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf_kit.data import tokenize_prompts
from rlhf_kit.data.formats import write_prompts
from rlhf_kit.ppo import held_out_size, load_prompt_sets, split_prompts

PROMPTS = [f"Human: question number {i} about topic {i * 7 % 13}\n\nAssistant:" for i in range(30)]


def settings(train, val=None, **kw):
    base = dict(train_prompts=str(train), val_prompts=val, val_size=None, num_val_samples=5, seed=0,
                max_prompt_length=64)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_split_is_a_seeded_partition_in_file_order():
    train, val = split_prompts(PROMPTS, 7, seed=3)
    assert len(val) == 7 and len(train) == 23
    assert sorted(train + val) == sorted(PROMPTS) and not set(train) & set(val)
    assert val == sorted(val, key=PROMPTS.index) and train == sorted(train, key=PROMPTS.index)
    assert split_prompts(PROMPTS, 7, seed=3) == (train, val)  # deterministic under a seed
    assert split_prompts(PROMPTS, 7, seed=4)[1] != val  # another seed holds out other prompts


@pytest.mark.parametrize("size", [0, 30, 31])
def test_split_refuses_a_size_that_leaves_no_training_prompts(size):
    with pytest.raises(ValueError, match=f"prompts.jsonl: --val-size {size} must be >= 1 and leave training"):
        split_prompts(PROMPTS, size, seed=0, source="prompts.jsonl")


def test_held_out_size_defaults_to_num_val_samples():
    assert held_out_size(SimpleNamespace(val_size=None, num_val_samples=5)) == 5
    assert held_out_size(SimpleNamespace(val_size=9, num_val_samples=5)) == 9


def test_held_out_prompts_never_reach_training_batches(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, PROMPTS)
    lines: list[str] = []
    stream, val_ids = load_prompt_sets(settings(path, val_size=6), tokenizer, log=lines.append)
    assert lines == [
        f"no --val-prompts: held out 6 of the 30 prompts of {path} for validation (seed 0); 24 left for training"
    ]
    expected_val = split_prompts(PROMPTS, 6, seed=0)[1]
    assert val_ids == tokenize_prompts(expected_val[:5], tokenizer, 64)[0]  # the first --num-val-samples
    held = {tuple(ids) for ids in tokenize_prompts(expected_val, tokenizer, 64)[0]}
    assert len(held) == 6
    seen = {tuple(p) for _ in range(10) for p in stream.next_batch(8)}  # 80 draws: over three epochs
    assert len(seen) == 24 and not seen & held


def test_given_val_prompts_are_used_whole_and_nothing_is_held_out(tmp_path, tokenizer):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_prompts(train, PROMPTS[:20])
    write_prompts(val, PROMPTS[20:])
    lines: list[str] = []
    stream, val_ids = load_prompt_sets(settings(train, str(val)), tokenizer, log=lines.append)
    assert not lines and len(stream.prompts) == 20
    assert val_ids == tokenize_prompts(PROMPTS[20:25], tokenizer, 64)[0]
