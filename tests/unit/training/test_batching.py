import pytest
import torch

from rlhf_kit.training.batching import BatchPlan, resolve_batch_sizes


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


def test_batch_plan_is_a_function_of_the_step():
    from rlhf_kit.training.batching import BatchPlan

    plan = BatchPlan(10, 4, seed=3)
    assert plan.steps_per_epoch == 2
    epoch0 = plan.global_batch_at(0) + plan.global_batch_at(1)
    assert len(set(epoch0)) == 8  # no repeats inside an epoch
    assert plan.global_batch_at(2) != plan.global_batch_at(0)  # a new permutation next epoch
    assert BatchPlan(10, 4, seed=3).global_batch_at(3) == plan.global_batch_at(3)  # fresh plan, same batch
    # micro-batching and world size only split the global batch
    for micro, world in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]:
        split = [i for r in range(world) for mb in plan.micro_batches(1, micro, r, world) for i in mb]
        assert split == plan.global_batch_at(1)
        assert all(len(mb) == micro for r in range(world) for mb in plan.micro_batches(1, micro, r, world))
    lengths = [1, 50, 2, 49, 3, 48, 4, 47]
    grouped = BatchPlan(8, 4, seed=0, lengths=lengths).global_batch_at(0)
    assert max(lengths[i] for i in grouped) == 50
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(3, 4)


def test_token_budget_split_fits_and_keeps_every_example():
    from rlhf_kit.training.batching import split_by_token_budget

    lengths = [10, 40, 25, 5, 40, 12, 80, 7]
    parts = split_by_token_budget(range(8), lengths, budget=60)
    assert sorted(i for p in parts for i in p) == list(range(8))
    for p in parts:  # padded cost within the budget, except an example over it alone
        assert len(p) * max(lengths[i] for i in p) <= 60 or len(p) == 1
    assert parts[0] == [6] and [len(p) for p in parts] == [1, 1, 1, 2, 3]  # longest first, greedy
    assert split_by_token_budget(range(8), lengths, 60) == parts  # a pure function
    more = split_by_token_budget(range(8), lengths, 60, parts=7)
    assert len(more) == 7 and sorted(i for p in more for i in p) == list(range(8))
    with pytest.raises(ValueError, match="into 4 micro-batches"):
        split_by_token_budget(range(8), lengths, 60, parts=4)
    with pytest.raises(ValueError, match="token budget"):
        split_by_token_budget(range(8), lengths, 0)


def test_token_budget_micro_batches_agree_across_ranks():
    """Every rank gets the same number of micro-batches (FSDP2 needs equal forward counts), each rank
    covers exactly its share of the step, and the shares are BatchPlan's."""
    from rlhf_kit.training.batching import token_budget_micro_batches

    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(4, 200, (64,), generator=g) * 2).tolist()
    plan = BatchPlan(64, 16, seed=3)
    for step in range(4):
        per_rank = [token_budget_micro_batches(plan, step, lengths, 300, r, 2) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])
        for r in range(2):
            share = plan.micro_batches(step, 8, r, 2)[0]
            assert sorted(i for p in per_rank[r] for i in p) == sorted(share)


def test_step_micro_batches_picks_the_budget_cut_or_fixed_micro_batches():
    """The recipes' one call: a budget cuts by padded cost, budget 0 gives fixed micro-batches of the
    step's same examples; a budget without costs is refused."""
    from rlhf_kit.training.batching import step_micro_batches

    lengths = [10 * (i % 7 + 1) for i in range(32)]
    plan = BatchPlan(32, 8, seed=1)
    cut = step_micro_batches(plan, 2, 1, 2, micro_batch_size=2, budget=80, costs=lengths)
    fixed = step_micro_batches(plan, 2, 1, 2, micro_batch_size=2)
    assert [len(m) for m in fixed] == [2, 2]
    assert all(len(m) * max(lengths[i] for i in m) <= 80 for m in cut)
    assert sorted(i for m in cut for i in m) == sorted(i for m in fixed for i in m)
    assert cut != fixed  # the budget packs short examples together instead of two at a time
    with pytest.raises(ValueError, match="costs"):
        step_micro_batches(plan, 0, micro_batch_size=2, budget=80)
