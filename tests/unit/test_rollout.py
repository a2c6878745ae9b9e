import pytest
import torch

from rlhf_kit.rollout import (
    Rollout,
    RolloutBuffer,
    concat_rollouts,
    length_grouped_micro_batches,
    sample_extents,
    trim_responses,
)


def make_rollout(b, p, n, fill, resp_len=None):
    resp_len = n if resp_len is None else resp_len
    rmask = (torch.arange(n)[None] < torch.as_tensor(resp_len).reshape(-1, 1)).long().expand(b, n)
    seq = torch.full((b, p + n), fill)
    seq[:, p:] = torch.where(rmask.bool(), seq[:, p:], torch.zeros_like(seq[:, p:]))
    am = torch.cat([torch.ones(b, p, dtype=torch.long), rmask], 1)
    f = lambda: torch.full((b, n), float(fill)) * rmask  # noqa: E731
    return Rollout(
        seq,
        am,
        rmask,
        f(),
        f(),
        f(),
        f(),
        f(),
        f(),
        torch.full((b,), float(fill)),
        torch.ones(b, dtype=torch.bool),
    )


def test_concat_pads_prompts_left_and_responses_right():
    a = make_rollout(2, 3, 4, fill=7)
    b = make_rollout(1, 5, 2, fill=9)
    c = concat_rollouts([a, b], pad_token_id=0)
    assert c.sequences.shape == (3, 9) and c.response_mask.shape == (3, 4)
    assert c.prompt_length == 5
    # a's prompt is left padded by 2, its response starts at column 5
    assert c.sequences[0].tolist() == [0, 0, 7, 7, 7, 7, 7, 7, 7]
    assert c.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert c.sequences[2].tolist() == [9, 9, 9, 9, 9, 9, 9, 0, 0]
    assert c.response_mask[2].tolist() == [1, 1, 0, 0]
    assert c.logprobs[2].tolist() == [9, 9, 0, 0]
    assert c.scores.tolist() == [7, 7, 9]


def test_buffer_minibatches_cover_every_sample_once_per_epoch_and_are_seeded():
    buf = RolloutBuffer(seed=3)
    for i in range(5):
        buf.append(make_rollout(2, 3, 4, fill=i + 1))
    assert len(buf) == 10
    seen = []
    for mb in buf.minibatches(batch_size=4, epochs=2):
        assert mb.batch_size <= 4
        seen += mb.scores.tolist()
    assert sorted(seen) == sorted([float(i + 1) for i in range(5) for _ in range(2)] * 2)
    buf2 = RolloutBuffer(seed=3)
    for i in range(5):
        buf2.append(make_rollout(2, 3, 4, fill=i + 1))
    seen2 = [x for mb in buf2.minibatches(batch_size=4, epochs=2) for x in mb.scores.tolist()]
    assert seen == seen2
    buf3 = RolloutBuffer(seed=4)
    buf3.set_data(buf.data())
    assert [x for mb in buf3.minibatches(4, 2) for x in mb.scores.tolist()] != seen


def test_trim_responses():
    r = make_rollout(3, 2, 6, fill=1, resp_len=[2, 3, 1])
    t = trim_responses(r)
    assert t.response_mask.shape == (3, 3) and t.sequences.shape == (3, 5)
    assert r.to("cpu").sequences.data_ptr() == r.sequences.data_ptr()


def test_length_grouped_micro_batches_drop_only_padding():
    """Samples with different left padding and response lengths: each micro-batch keeps the columns its
    samples use, and every sample's real tokens, masks and per-token fields are unchanged."""
    r = make_rollout(4, 5, 6, fill=3, resp_len=[6, 2, 4, 1])
    pads = [0, 3, 1, 4]  # left padding of each prompt
    for i, k in enumerate(pads):
        r.sequences[i, :k] = 0
        r.attention_mask[i, :k] = 0
    r.sequences[:, :5] += torch.arange(5)  # distinct prompt tokens, so a shifted column would show
    firsts, lasts, runs, lengths = sample_extents(r)
    assert firsts == pads and lasts == [6, 2, 4, 1] and runs == [1, 1, 1, 1]
    assert lengths == [5 - k + n for k, n in zip(pads, [6, 2, 4, 1])]  # real prompt + response tokens
    holes = r.attention_mask.clone()
    holes[0, 6] = 0  # a pad inside sample 0's response: not one run of real tokens
    assert sample_extents(Rollout(**{**r.__dict__, "attention_mask": holes}))[2] == [0, 1, 1, 1]
    groups = [[1, 3], [0, 2]]
    parts = length_grouped_micro_batches(r, groups)
    assert [tuple(m.sequences.shape) for m in parts] == [(2, 2 + 2), (2, 5 + 6)]
    assert [m.prompt_length for m in parts] == [2, 5]
    for m, idx in zip(parts, groups):
        for row, i in enumerate(idx):
            keep = m.attention_mask[row].bool()
            assert torch.equal(m.sequences[row][keep], r.sequences[i][r.attention_mask[i].bool()])
            n = m.response_mask.shape[1]
            for f in ("response_mask", "logprobs", "advantages", "returns"):
                full = getattr(r, f)[i]
                assert torch.equal(getattr(m, f)[row], full[:n]) and not full[n:].any()
            assert m.scores[row] == r.scores[i]


def test_pack_by_token_budget_counts_the_widest_prompt_and_response_of_each_group():
    from rlhf_kit.rollout import pack_by_token_budget

    # samples 0 and 1 are as long (10 tokens) but padded together they need 2 x (8 + 8) = 32 tokens
    prompts, responses = [8, 2, 3, 1, 1], [2, 8, 3, 2, 1]
    assert pack_by_token_budget(prompts, responses, 20) == [[0], [1], [2, 3, 4]]  # 3 x (3 + 3) = 18
    assert pack_by_token_budget(prompts, responses, 32) == [[0, 1], [2, 3, 4]]
    for budget in (1, 6, 20, 32, 100):
        for parts in range(len(pack_by_token_budget(prompts, responses, budget)), 6):
            groups = pack_by_token_budget(prompts, responses, budget, parts)
            assert len(groups) == parts and sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot cut 5 samples into 6"):
        pack_by_token_budget(prompts, responses, 20, 6)
