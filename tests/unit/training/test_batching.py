import pytest

from rlhf_kit.training.batching import resolve_batch_sizes


def test_grad_accum_from_global_micro_world():
    assert resolve_batch_sizes(64, 4, 2) == 8
    assert resolve_batch_sizes(4, 4) == 1
    assert resolve_batch_sizes(12, 1, 3) == 4


def test_not_divisible_is_one_line_reason():
    with pytest.raises(ValueError) as e:
        resolve_batch_sizes(64, 3, 2)
    assert str(e.value) == "global batch 64 is not divisible by micro batch 3 x world size 2 = 6"
    with pytest.raises(ValueError, match="micro batch must be a positive integer"):
        resolve_batch_sizes(8, 0, 1)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_batch_sizes(2, 4, 1)
