import random

import torch
from torch.utils.data import DataLoader

from rlhf_kit.data import LengthGroupedSampler, pair_lengths


def _lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 500) for _ in range(n)]


def _spread(batches, lengths):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_permutation_and_determinism():
    lengths = _lengths()
    s = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_mult=10)
    first = list(s)
    assert sorted(first) == list(range(len(lengths))) and len(s) == len(lengths)
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_mult=10)) == first
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)
    s.set_epoch(0)
    assert list(s) == first
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=4, mega_batch_mult=10)) != first


def test_groups_lengths_and_longest_first():
    lengths = _lengths()
    s = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega_batch_mult=10)
    batches = s.batches()
    assert all(len(b) == 8 for b in batches)
    assert lengths[batches[0][0]] == max(lengths)
    g = torch.Generator().manual_seed(0)
    random_batches = torch.randperm(len(lengths), generator=g).view(-1, 8).tolist()
    assert _spread(batches, lengths) < 0.2 * _spread(random_batches, lengths)


def test_dataloader_batches_match_and_pair_lengths():
    examples = [{"chosen_input_ids": [0] * n, "rejected_input_ids": [0] * (n // 2 + 1)} for n in _lengths(37)]
    lengths = pair_lengths(examples)
    assert lengths == [len(e["chosen_input_ids"]) for e in examples]
    s = LengthGroupedSampler(lengths, batch_size=4, seed=0, mega_batch_mult=2)
    loaded = [b.tolist() for b in DataLoader(range(37), batch_size=4, sampler=s)]
    assert loaded == s.batches() and [len(b) for b in loaded][-1] == 1
