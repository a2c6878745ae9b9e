"""Left-padded batches run with each row moved to the front and no mask: the same outputs."""

import pytest
import torch

from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.models import TokenValueModel, response_values
from rlhf_kit.models.layout import LeftAlignment, left_alignment
from tests.conftest import make_causal_lm, make_reward_model


def _rows(b=4, p=6, n=5, seed=0):
    """Left-padded prompts of width p, right-padded responses of width n (one run of real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (b, p + n), generator=g)
    mask = torch.ones(b, p + n, dtype=torch.long)
    for r, (pad, resp) in enumerate(zip([0, 3, 1, 5][:b], [5, 2, 4, 1][:b])):
        mask[r, :pad] = 0
        mask[r, p + resp :] = 0
        ids[r, :pad] = 0
        ids[r, p + resp :] = 0
    return ids, mask, p


def _masked(la: LeftAlignment) -> LeftAlignment:
    """The same alignment marked unusable: the forward keeps the original layout and its mask."""
    return LeftAlignment(la.shifts, la.max_shift, False)


def test_left_alignment_finds_padding_and_runs():
    ids, mask, p = _rows()
    la = left_alignment(mask)
    assert la.shifts.tolist() == [0, 3, 1, 5] and la.max_shift == 5 and la.contiguous
    assert la.lengths == tuple(mask.sum(-1).tolist()) == (11, 5, 9, 2)  # read with the rest
    moved = la.align(mask)
    assert torch.equal(moved, (torch.arange(11) < mask.sum(-1, keepdim=True)).long())  # right padded now
    assert torch.equal(la.align(ids)[1, :8], ids[1, 3:])  # row 1 moved 3 to the left
    holes = mask.clone()
    holes[0, 2] = 0
    assert not left_alignment(holes).contiguous


@pytest.mark.parametrize("entropy", [False, True])
def test_aligned_logprobs_and_gradients_equal_the_masked_forward(tokenizer, entropy):
    model = make_causal_lm(tokenizer, seed=3).double()
    ids, mask, p = _rows()
    masks = []
    model.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    la = left_alignment(mask)
    outs, grads = [], []
    for alignment in (la, _masked(la)):
        model.zero_grad()
        out = sequence_logprobs(model, ids, mask, p, 0.7, with_entropy=entropy, alignment=alignment)
        out = out if entropy else (out,)
        sum((o * mask[:, p:]).sum() for o in out).backward()
        outs.append([o * mask[:, p:] for o in out])
        grads.append([q.grad.clone() for q in model.parameters()])
    assert masks[0] is None and masks[1] is not None  # the aligned pass built no mask
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    # without a given alignment the function finds the same one
    torch.testing.assert_close(sequence_logprobs(model, ids, mask, p, 0.7) * mask[:, p:], outs[0][0])


def test_aligned_values_equal_the_masked_forward(tokenizer):
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4).double())
    ids, mask, p = _rows()
    la = left_alignment(mask)
    fast = response_values(critic, ids, mask, p, alignment=la)
    slow = response_values(critic, ids, mask, p, alignment=_masked(la))
    torch.testing.assert_close(fast * mask[:, p:], slow * mask[:, p:], atol=1e-10, rtol=1e-9)
    assert fast.shape == (4, 5)


def test_the_lm_head_projects_only_the_response_positions(tokenizer, monkeypatch):
    """The aligned pass gathers each row's n response positions before the LM head: it projects (b, n)
    hidden states (not the n + 1 + widest-padding kept columns) and leaves no hook behind; a model
    without output embeddings takes the gather after the head. Both equal the masked forward."""
    model = make_causal_lm(tokenizer, seed=5).double()
    ids, mask, p = _rows()
    la = left_alignment(mask)
    shapes = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    fast = sequence_logprobs(model, ids, mask, p, alignment=la)
    slow = sequence_logprobs(model, ids, mask, p, alignment=_masked(la))
    assert shapes[0] == (4, 5, len(tokenizer)) and shapes[1] == (4, 6, len(tokenizer))
    assert not head._forward_pre_hooks  # the gather hook is removed after the call
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-9)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    shapes.clear()
    headless = sequence_logprobs(model, ids, mask, p, alignment=la)
    assert shapes[0] == (4, 5 + 1 + la.max_shift, len(tokenizer))  # every kept column projected
    torch.testing.assert_close(headless, slow, atol=1e-10, rtol=1e-9)
    handle.remove()


def test_aligned_passes_skip_the_mask_builders_host_read(tokenizer, family, host_reads):
    """A maskless forward of aligned rows skips transformers' check of the position ids for packed
    sequences (``masking_utils``: a read of the device per forward), with the same outputs as the
    masked forward; the config names SDPA again afterwards. A sliding window shorter than the rows keeps
    transformers' own path (it builds the window's mask). (GPT-2's forward makes one read of its own:
    whether the pad id is in the first or last column.)"""
    from rlhf_kit.models import reward_scores

    def mask_reads():
        return [where for _, where in host_reads if where.endswith("masking_utils.py")]

    model = make_causal_lm(tokenizer, family=family, seed=3).double()
    assert model.config._attn_implementation == "sdpa"
    ids, mask, p = _rows()
    la = left_alignment(mask)
    host_reads.clear()
    fast = sequence_logprobs(model, ids, mask, p, alignment=la)
    assert not mask_reads() and not host_reads.ours(), host_reads
    assert model.config._attn_implementation == "sdpa"
    slow = sequence_logprobs(model, ids, mask, p, alignment=_masked(la))
    torch.testing.assert_close(fast * mask[:, p:], slow * mask[:, p:], atol=1e-10, rtol=1e-9)
    critic = TokenValueModel(make_reward_model(tokenizer, family=family, seed=4).double())
    host_reads.clear()
    response_values(critic, ids, mask, p, alignment=la)
    assert not mask_reads() and not host_reads.ours(), host_reads
    rm = make_reward_model(tokenizer, family=family, seed=5).double()
    host_reads.clear()
    reward_scores(rm, ids, mask)
    assert not mask_reads() and host_reads.ours() == ["tolist"], host_reads  # left_alignment's
    if family == "mistral":
        windowed = make_causal_lm(tokenizer, family="mistral", seed=3, sliding_window=4).double()
        host_reads.clear()
        sequence_logprobs(windowed, ids, mask, p, alignment=la)
        assert mask_reads()


def test_rows_without_left_padding_run_maskless_too(tokenizer, host_reads):
    """A micro-batch cut to its own columns often has no left padding left, only responses of several
    lengths: causal attention needs no mask for right padding either, so it takes the maskless path (no
    mask built, no read of the device) with the masked forward's outputs."""

    def mask_reads():
        return [where for _, where in host_reads if where.endswith("masking_utils.py")]

    model = make_causal_lm(tokenizer, seed=3).double()
    ids, mask, p = _rows()
    ids, mask = ids[:, 5:], mask[:, 5:]  # no prompt padding left in any row; responses of 5, 2, 4 and 1
    p -= 5
    mask[:, :p] = 1
    la = left_alignment(mask)
    assert la.max_shift == 0 and la.contiguous
    host_reads.clear()
    fast = sequence_logprobs(model, ids, mask, p, alignment=la)
    assert not mask_reads(), host_reads
    slow = sequence_logprobs(model, ids, mask, p, alignment=_masked(la))
    assert mask_reads()  # the masked forward: transformers reads the mask to decide how to mask
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-9)
    critic = TokenValueModel(make_reward_model(tokenizer, seed=4).double())
    host_reads.clear()
    fast_v = response_values(critic, ids, mask, p, alignment=la)
    assert not mask_reads(), host_reads
    torch.testing.assert_close(fast_v, response_values(critic, ids, mask, p, alignment=_masked(la)))


def test_rows_without_left_padding_on_a_real_like_checkpoint(tmp_path, host_reads):
    """The same maskless path on a checkpoint set up like a real one: bf16 weights, pad == EOS (so the
    right padding is EOS tokens), a config pad id that differs from the tokenizer's, attention dropout in
    the config. The log-probs and values equal the masked forward's (compared in float32)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_kit.tiny import save_real_like_checkpoint

    path = save_real_like_checkpoint(str(tmp_path / "m"), pad="eos")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert tok.pad_token_id == tok.eos_token_id and model.config.pad_token_id != tok.pad_token_id
    model = model.float()
    g = torch.Generator().manual_seed(0)
    p, n = 4, 5
    ids = torch.randint(10, len(tok), (3, p + n), generator=g)
    mask = torch.ones_like(ids)
    for r, resp in enumerate([5, 2, 3]):  # right padding only, with the pad (= EOS) token
        ids[r, p + resp :], mask[r, p + resp :] = tok.pad_token_id, 0
    la = left_alignment(mask)
    assert la.max_shift == 0 and la.contiguous
    host_reads.clear()
    fast = sequence_logprobs(model, ids, mask, p, alignment=la)
    assert not [w for _, w in host_reads if w.endswith("masking_utils.py")], host_reads
    torch.testing.assert_close(fast, sequence_logprobs(model, ids, mask, p, alignment=_masked(la)))
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.bfloat16).float()
    critic = TokenValueModel(rm.eval())
    torch.testing.assert_close(
        response_values(critic, ids, mask, p, alignment=la),
        response_values(critic, ids, mask, p, alignment=_masked(la)),
    )
