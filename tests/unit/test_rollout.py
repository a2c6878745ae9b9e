import torch

from rlhf_kit.rollout import Rollout, RolloutBuffer, concat_rollouts, split_rollout, trim_responses


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


def test_trim_and_split():
    r = make_rollout(3, 2, 6, fill=1, resp_len=[2, 3, 1])
    t = trim_responses(r)
    assert t.response_mask.shape == (3, 3) and t.sequences.shape == (3, 5)
    parts = split_rollout(r, 2)
    assert [p.batch_size for p in parts] == [2, 1]
    assert r.to("cpu").sequences.data_ptr() == r.sequences.data_ptr()
