import random

import numpy as np
import torch

from rlhf_kit.training import dist as D


def test_single_process_defaults():
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process() and not D.is_dist()
    D.barrier()  # no-op without a process group


def test_seed_everything_is_reproducible_and_rank_offset(monkeypatch):
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    assert D.seed_everything(7) == 7
    a = draw()
    D.seed_everything(7)
    assert draw() == a
    monkeypatch.setattr(D, "rank", lambda: 3)
    assert D.seed_everything(7) == 10
    assert draw() != a
    assert D.seed_everything(7, rank_offset=False) == 7
    assert draw() == a
