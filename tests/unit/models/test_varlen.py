"""Padding-free forward passes under variable-length attention: the same outputs as the padded forward."""

import pytest
import torch

from rlhf_kit.logprobs import sequence_logprobs
from rlhf_kit.models.layout import left_alignment
from rlhf_kit.models.varlen import (
    IMPLEMENTATION,
    PACKED_MODEL_TYPES,
    packed_attention,
    packed_attention_forward,
    packed_row_kwargs,
    packing,
    use_packed,
)
from tests.conftest import make_causal_lm
from tests.unit.models.test_layout import _rows


def test_packing_lays_rows_end_to_end_with_a_filler():
    pk = packing(torch.tensor([3, 0, 5, 2]), multiple=4)
    assert pk.total == 12 and pk.cu_seqlens.tolist() == [0, 3, 3, 8, 10, 12] and pk.max_len == 8  # >= 5
    assert pk.starts.tolist() == [0, 3, 3, 8]
    assert pk.position_ids(torch.device("cpu")).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1]]
    x = torch.arange(4 * 6).reshape(4, 6)
    assert pk.pack(x, fill=-1).tolist() == [[0, 1, 2, 12, 13, 14, 15, 16, 18, 19, -1, -1]]
    # columns past a row's end stay inside the row (the caller masks them)
    assert pk.index(torch.tensor([[0, 2, 4]] * 4)).tolist() == [[0, 2, 2], [3, 3, 3], [3, 5, 7], [8, 9, 9]]
    exact = packing(torch.tensor([4, 4]), multiple=8)
    assert exact.total == 8 and exact.cu_seqlens.tolist() == [0, 4, 8]  # no filler row needed
    assert exact.max_len == 8  # rounded up, never past the total
    with pytest.raises(ValueError, match="multiple"):
        packing(torch.tensor([1]), multiple=0)


def test_pack_reads_nothing_on_the_host_and_packing_takes_known_lengths(tokenizer, host_reads):
    """``Packing.pack`` is a gather of fixed shape: it runs on the meta device, which holds no values (a
    boolean selection needs the count of selected values first: on a GPU, a wait for the device). A
    packed log-prob pass reads the host once: the lengths come with the alignment's read."""
    pk = packing(torch.tensor([3, 0, 5, 2]), multiple=4)
    x = torch.arange(4 * 6 * 2).reshape(4, 6, 2)
    want = [[0, 1], [2, 3], [4, 5], [24, 25], [26, 27], [28, 29], [30, 31], [32, 33], [36, 37], [38, 39]]
    assert pk.pack(x, fill=-1)[0].tolist() == want + [[-1, -1]] * 2
    assert pk.pack(torch.empty(4, 6, 2, device="meta"), fill=-1).shape == (1, 12, 2)
    same = packing(torch.tensor([3, 0, 5, 2]), multiple=4, host=[3, 0, 5, 2])
    assert same.cu_seqlens.tolist() == pk.cu_seqlens.tolist() and same.max_len == pk.max_len
    with pytest.raises(ValueError, match="3 rows"):
        packing(torch.tensor([3, 0, 5, 2]), host=[3, 0, 5])
    model = make_causal_lm(tokenizer, seed=3).double()
    ids, mask, p = _rows()
    host_reads.clear()
    packed = sequence_logprobs(model, ids, mask, p, packed="on")
    assert host_reads.ours() == ["tolist"], host_reads  # left_alignment's
    torch.testing.assert_close(packed, sequence_logprobs(model, ids, mask, p), atol=1e-10, rtol=1e-9)


def test_packed_forward_equals_each_row_alone(tokenizer):
    """GQA Llama (4 heads, 2 KV heads): each packed row's logits are those of the row run by itself."""
    model = make_causal_lm(tokenizer, seed=1).double()
    assert model.config.num_attention_heads != model.config.num_key_value_heads
    lengths = torch.tensor([5, 1, 7, 3])
    rows = [
        torch.randint(3, 400, (int(n),), generator=torch.Generator().manual_seed(i))
        for i, n in enumerate(lengths)
    ]
    pk = packing(lengths, multiple=8)
    padded = torch.zeros(4, 7, dtype=torch.long)
    for r, row in enumerate(rows):
        padded[r, : len(row)] = row
    with torch.no_grad():
        with packed_attention(model):
            packed = model(
                input_ids=pk.pack(padded), use_cache=False, **pk.forward_kwargs(padded.device)
            ).logits
        alone = [model(input_ids=row[None], use_cache=False).logits[0] for row in rows]
    for r, want in enumerate(alone):
        s = int(pk.starts[r])
        torch.testing.assert_close(packed[0, s : s + len(rows[r])], want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("entropy", [False, True])
def test_packed_logprobs_and_gradients_equal_the_padded_forward(tokenizer, entropy):
    model = make_causal_lm(tokenizer, seed=3).double()
    ids, mask, p = _rows()
    la = left_alignment(mask)
    shapes = []
    model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    outs, grads = [], []
    for packed in (True, False):
        model.zero_grad()
        out = sequence_logprobs(model, ids, mask, p, 0.7, with_entropy=entropy, alignment=la, packed=packed)
        out = out if entropy else (out,)
        sum((o * mask[:, p:]).sum() for o in out).backward()
        outs.append(out)
        grads.append([q.grad.clone() for q in model.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert shapes == [(1, 64), ids.shape]  # 27 real tokens packed into one row of 64, then the padded batch
    assert model.config._attn_implementation != IMPLEMENTATION  # switched back after the forward


def test_packed_logprobs_of_right_padded_rows_and_an_empty_response(tokenizer):
    """No left padding (nothing to move) and a row whose response is all padding: still the padded result."""
    model = make_causal_lm(tokenizer, seed=4).double()
    ids, mask, p = _rows(b=3)
    mask[:, :p] = 1  # prompts fill their width
    mask[2, p:] = 0  # an empty response
    with torch.no_grad():
        got = sequence_logprobs(model, ids, mask, p, packed=True)
        want = sequence_logprobs(model, ids, mask, p)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    assert got[2].abs().sum() == 0


def test_packed_attention_restores_the_config_and_refuses_misuse(tokenizer):
    model = make_causal_lm(tokenizer)
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), packed_attention(model):
        assert model.config._attn_implementation == IMPLEMENTATION
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_attention_forward(model, q, q, q, None)
    with pytest.raises(ValueError, match="no attention mask"):
        packed_attention_forward(model, q, q, q, torch.zeros(1, 1, 4, 4), cu_seq_lens_q=torch.tensor([0, 4]))


def test_packed_values_and_gradients_equal_the_padded_forward(tokenizer):
    from rlhf_kit.models import TokenValueModel, response_values
    from tests.conftest import make_reward_model

    critic = TokenValueModel(make_reward_model(tokenizer, seed=5).double())
    ids, mask, p = _rows()
    outs, grads = [], []
    for packed in (True, False):
        critic.zero_grad()
        values = response_values(critic, ids, mask, p, packed=packed)
        values.pow(2).sum().backward()
        outs.append(values)
        grads.append([q.grad.clone() for q in critic.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-9)
    assert outs[0][mask[:, p:] == 0].abs().sum() == 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_flash_call_is_causal_per_row_with_native_grouped_heads(monkeypatch):
    """The CUDA path's call into aten's flash forward, with a stand-in that implements its contract
    (positional ``q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask``, ``scale``
    by keyword, fewer key/value heads than query heads served as they are; a 5-tuple, the output first):
    no dropout, causal, and keys/values handed over without being repeated per query head."""
    import torch.nn.functional as F

    from rlhf_kit.models import varlen

    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
        seen.update(
            kv_heads=k.shape[1], dropout=dropout_p, causal=is_causal, debug=return_debug_mask, m=max_q
        )
        b = cu_q.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=is_causal, scale=scale, enable_gqa=True).transpose(0, 1)
            for s, e in zip(b[:-1], b[1:])
        ])  # fmt: skip
        return out, None, None, None, None

    monkeypatch.setattr(varlen, "_FLASH_FORWARD", fake)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(9, 4, 8, generator=g),
        torch.randn(9, 2, 8, generator=g),
        torch.randn(9, 2, 8, generator=g),
    )
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    got = varlen._varlen_causal(q, k, v, cu, 5, 0.3)
    assert seen == {"kv_heads": 2, "dropout": 0.0, "causal": True, "debug": False, "m": 5}
    want = torch.cat([
        F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1).repeat_interleave(2, 0),
                                       v[s:e].transpose(0, 1).repeat_interleave(2, 0), is_causal=True, scale=0.3).transpose(0, 1)
        for s, e in ((0, 4), (4, 9))
    ])  # fmt: skip
    torch.testing.assert_close(got, want)


def test_flash_call_matches_this_torchs_op_and_differentiates_compiled():
    """Against the real aten op of the installed torch, on the meta device (shapes, no values; no GPU
    needed): the call's positional order is the op's schema, autograd has a formula for it that gives
    grouped key/value heads their own gradient shapes, and it traces whole under ``torch.compile``."""
    from rlhf_kit.models import varlen

    names = [a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments]
    assert names[:10] == ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                          "is_causal", "return_debug_mask"] and "scale" in names  # fmt: skip
    meta = {"device": "meta", "dtype": torch.bfloat16, "requires_grad": True}
    q, k, v = torch.empty(9, 4, 8, **meta), torch.empty(9, 2, 8, **meta), torch.empty(9, 2, 8, **meta)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="meta")
    compiled = torch.compile(
        lambda *a: varlen._varlen_causal(*a, 5, 0.3), fullgraph=True, backend="aot_eager"
    )
    for fn in (varlen._varlen_causal, compiled):
        q.grad = k.grad = v.grad = None
        args = (q, k, v, cu) if fn is compiled else (q, k, v, cu, 5, 0.3)
        out = fn(*args)
        assert out.shape == (9, 4, 8)
        out.sum().backward()
        assert (q.grad.shape, k.grad.shape, v.grad.shape) == (q.shape, k.shape, v.shape)


def test_packed_pass_in_bf16_on_this_device(tokenizer, monkeypatch):
    """The dtype and device PPO runs in: bf16, on CUDA when there is one (then through aten's flash attention,
    forward and backward), else the per-row path. Log-probs and gradients agree with the padded bf16 pass
    to bf16's precision."""
    from rlhf_kit.models import varlen

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    if varlen._FLASH:
        real = varlen._FLASH_FORWARD
        monkeypatch.setattr(varlen, "_FLASH_FORWARD", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_causal_lm(tokenizer, seed=6).to(device, torch.bfloat16)
    ids, mask, p = (t.to(device) if torch.is_tensor(t) else t for t in _rows())
    outs, grads = [], []
    for packed in (True, False):
        model.zero_grad()
        out = sequence_logprobs(model, ids, mask, p, alignment=left_alignment(mask), packed=packed)
        (out.float() * mask[:, p:]).sum().backward()
        outs.append(out.float() * mask[:, p:])
        grads.append(torch.cat([q.grad.float().flatten() for q in model.parameters()]))
    assert len(calls) == (1 if device.type == "cuda" else 0) * model.config.num_hidden_layers
    # the default packs on CUDA only, and only models at least PACKED_AUTO_MIN_HIDDEN wide (this one is not)
    assert not varlen.use_packed("auto", model, ids)
    monkeypatch.setattr(varlen, "PACKED_AUTO_MIN_HIDDEN", model.config.hidden_size)
    assert varlen.use_packed("auto", model, ids) == (device.type == "cuda")
    torch.testing.assert_close(outs[0], outs[1], atol=0.05, rtol=0.02)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("family", PACKED_MODEL_TYPES)
def test_every_verified_family_packs_to_the_padded_logprobs(tokenizer, family):
    model = make_causal_lm(tokenizer, family=family, seed=7).double()
    ids, mask, p = _rows()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        got = sequence_logprobs(model, ids, mask, p, packed="on")
        want = sequence_logprobs(model, ids, mask, p, packed="off")
    assert seen == [1, 4]  # one packed row, then the padded batch
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_use_packed_follows_the_setting_and_refuses_what_it_cannot_do_exactly(tokenizer, monkeypatch):
    from rlhf_kit.models import varlen

    ids = torch.zeros(2, 11, dtype=torch.long)
    llama = make_causal_lm(tokenizer)
    assert use_packed("on", llama, ids) and use_packed(True, llama, ids)
    assert not use_packed("off", llama, ids) and not use_packed(False, llama, ids)
    assert not use_packed("auto", llama, ids)  # on the CPU the packed attention is a loop over rows
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        use_packed("yes", llama, ids)
    windowed = make_causal_lm(tokenizer, family="mistral", sliding_window=8)
    assert use_packed("on", windowed, ids[:, :8])  # rows within the window: plain causal attention is exact
    with pytest.raises(ValueError, match="sliding window \\(8\\) is shorter than the rows \\(11"):
        use_packed("on", windowed, ids)
    qwen = make_causal_lm(tokenizer, family="qwen2", sliding_window=4, use_sliding_window=False)
    assert use_packed("on", qwen, ids)  # a window that is switched off does not count
    monkeypatch.setattr(varlen, "PACKED_MODEL_TYPES", ("gpt2",))
    with pytest.raises(ValueError, match="model type 'llama' is not verified"):
        use_packed("on", llama, ids)


def test_auto_packs_only_models_wide_enough_to_gain(tokenizer, monkeypatch):
    """Where ``auto`` would pack (CUDA, varlen attention, half precision: stood in for here, as the CPU has
    none of them), it packs a model at least ``PACKED_AUTO_MIN_HIDDEN`` wide and not a narrower one."""
    from rlhf_kit.models import varlen

    cuda_ids = type("Ids", (), {"shape": (2, 11), "device": torch.device("cuda")})()  # for a CUDA batch
    monkeypatch.setattr(varlen, "_flash_device", lambda index: True)
    monkeypatch.setattr(varlen, "_half_compute", lambda model, found, device_type: True)
    narrow = make_causal_lm(tokenizer)  # hidden 64
    assert varlen._hidden_size(varlen._configs(narrow)) == narrow.config.hidden_size
    assert not use_packed("auto", narrow, cuda_ids)
    assert use_packed("on", narrow, cuda_ids)  # "on" still packs it
    monkeypatch.setattr(varlen, "PACKED_AUTO_MIN_HIDDEN", narrow.config.hidden_size)
    assert use_packed("auto", narrow, cuda_ids)
    gpt2 = make_causal_lm(tokenizer, family="gpt2")
    assert varlen._hidden_size(varlen._configs(gpt2)) == gpt2.config.n_embd > 0


@pytest.mark.parametrize("family", PACKED_MODEL_TYPES)
def test_packed_reward_scores_equal_the_padded_ones(tokenizer, family, tmp_path):
    """The reward model's scores at each row's last real token, packed and padded (left-padded prompts,
    right-padded responses; the HF classifier's own pooling is not used either way)."""
    from rlhf_kit.models import reward_scores
    from rlhf_kit.ppo.setup import make_scorer
    from tests.conftest import make_reward_model

    rm = make_reward_model(tokenizer, family=family, seed=8).double()
    ids, mask, _ = _rows()
    seen = []
    rm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    got = reward_scores(rm, ids, mask, packed="on")
    want = reward_scores(rm, ids, mask, packed="off")
    assert seen == [1, 4]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    kw = dict(reward_fn=None, reward_model=rm, reward_model_path=str(tmp_path))
    scorer, _ = make_scorer(None, **kw, packed="on")
    torch.testing.assert_close(scorer(ids, mask), want, atol=1e-10, rtol=1e-9)
    assert seen[-1] == 1 and make_scorer(None, **kw)[0].packed == "auto"


def test_half_compute_sees_autocast_half_weights_and_an_fsdp2_policy(tokenizer, tmp_path):
    """What ``use_packed("auto")`` asks of the dtype: the attention must see bf16/fp16, which fp32 weights
    give under autocast or under FSDP2 with a bf16 ``param_dtype`` (the recipe's multi-GPU setting)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from rlhf_kit.models import varlen
    from rlhf_kit.models.varlen import _walk

    def _half_compute(model, device_type):
        return varlen._half_compute(model, _walk(model), device_type)

    model = make_causal_lm(tokenizer)
    assert not _half_compute(model, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _half_compute(model, "cpu")
    assert _half_compute(make_causal_lm(tokenizer).to(torch.bfloat16), "cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded, plain = make_causal_lm(tokenizer), make_causal_lm(tokenizer)
        fully_shard(sharded, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        fully_shard(plain)
        assert next(sharded.parameters()).dtype == torch.float32  # the shards stay fp32
        assert _half_compute(sharded, "cpu") and not _half_compute(plain, "cpu")
    finally:
        dist.destroy_process_group()


def _checkpoint_functions(model):
    """Each checkpointed layer's checkpoint function, by name."""
    return {
        n: m._gradient_checkpointing_func
        for n, m in model.named_modules()
        if getattr(m, "gradient_checkpointing", False) is True
    }


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_training_under_gradient_checkpointing_equals_the_padded_pass(tokenizer, reentrant):
    """Checkpointed layers are recomputed in the backward pass, after :func:`packed_attention` has exited:
    the recomputation must run the packed attention again, or its rows attend across each other (or fail
    for want of a mask). Gradients equal those of the padded pass without checkpointing; the layers'
    checkpoint functions are their own again afterwards."""
    model = make_causal_lm(tokenizer, seed=3).double().train()
    ids, mask, p = _rows()
    grads = []
    for packed in (False, True):
        if packed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            own = _checkpoint_functions(model)
            assert own and use_packed("on", model, ids)
        model.zero_grad()
        lp = sequence_logprobs(model, ids, mask, p, 0.7, packed=packed)
        (lp * mask[:, p:]).sum().backward()
        grads.append([q.grad.clone() for q in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert _checkpoint_functions(model) == own
    assert model.config._attn_implementation != IMPLEMENTATION


def test_packed_checkpointed_blocks_compile_once(tokenizer):
    """Under ``torch.compile`` (regional, the recipe's ``--compile-blocks``) with gradient checkpointing, the
    packed passes reuse one wrapped checkpoint function per layer, so later micro-batches of the same
    packed length recompile nothing; gradients still equal the padded pass's."""
    from rlhf_kit.models.compile import compile_blocks

    torch._dynamo.reset()
    ids, mask, p = _rows()
    ref = make_causal_lm(tokenizer, seed=3).double().train()
    ref.zero_grad()
    (sequence_logprobs(ref, ids, mask, p, packed=False) * mask[:, p:]).sum().backward()
    model = make_causal_lm(tokenizer, seed=3).double().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_blocks(model, backend="aot_eager")
    counts = []
    for _ in range(3):
        model.zero_grad()
        (sequence_logprobs(model, ids, mask, p, packed="on") * mask[:, p:]).sum().backward()
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[1] == counts[2] > 0
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-9, rtol=1e-7)


def test_packed_row_kwargs_and_the_sft_loss_under_varlen_attention(tokenizer):
    """An already packed SFT row (:class:`PackedSFTCollator`) under the packed attention: boundaries from
    the position ids, and the same loss and gradients as transformers' block-diagonal mask (float64)."""
    from rlhf_kit.data import PackedSFTCollator
    from rlhf_kit.training.evaluation import lm_loss

    kw = packed_row_kwargs(torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 4]]), multiple=4)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 4, 9] and kw["max_length_q"] == 8  # 5 rounded up to 4s
    assert packed_row_kwargs(torch.tensor([[0, 1, 2]]))["max_length_k"] == 3  # never past the row
    with pytest.raises(ValueError, match="start at 0"):
        packed_row_kwargs(torch.tensor([[1, 0, 1]]))
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (6, 3, 9):
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    batch = PackedSFTCollator()(examples)
    model = make_causal_lm(tokenizer, seed=2).double()
    losses, grads = [], []
    for packed in ("on", "off"):
        model.zero_grad()
        loss = lm_loss(model, batch, num_items=10.0, packed=packed)
        loss.backward()
        losses.append(loss.detach())
        grads.append([q.grad.clone() for q in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-12, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_configs_found_without_modules_walk_match_the_plain_walk(tokenizer):
    """``_configs`` walks ``_modules`` and reads ``vars`` (it runs before every packed forward); it finds what
    ``modules()`` plus ``hasattr`` finds, through a value-head wrapper, a LoRA wrapper (whose ``config`` is
    forwarded) and a module whose class exposes ``config`` as a property."""
    from peft import LoraConfig, get_peft_model

    from rlhf_kit.models import TokenValueModel
    from rlhf_kit.models.varlen import _configs, _submodules

    def plain(model):
        return {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}

    class Holder(torch.nn.Module):  # its config is neither a submodule's nor in its own __dict__
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self._settings = type(inner.config)()

        @property
        def config(self):
            return self._settings

    lm = make_causal_lm(tokenizer, seed=0)
    lora = get_peft_model(make_causal_lm(tokenizer, seed=1), LoraConfig(r=2, target_modules=["q_proj"]))
    value = TokenValueModel(make_causal_lm(tokenizer, seed=2).model)
    for model in (lm, lora, value, Holder(lm), torch.nn.Linear(2, 2)):
        assert _configs(model).keys() == plain(model).keys()
        assert sorted(map(id, _submodules(model))) == sorted(map(id, model.modules()))  # none shared here
    assert len(_configs(torch.nn.ModuleList([lm, value]))) == 2
    assert len(_configs(Holder(lm))) == 2


def test_a_packed_forward_walks_the_model_twice(tokenizer, monkeypatch):
    """``use_packed`` and ``packed_attention`` each walk the modules once (a walk of a 24-layer model costs
    about 0.1-0.2 ms of host time, before every packed forward), finding the checkpointed layers too."""
    from rlhf_kit.models import varlen

    model = make_causal_lm(tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    walks = []
    plain = varlen._submodules
    monkeypatch.setattr(varlen, "_submodules", lambda m: walks.append(m) or plain(m))
    cuda_ids = type("Ids", (), {"shape": (2, 11), "device": torch.device("cuda")})()
    monkeypatch.setattr(varlen, "_flash_device", lambda index: True)
    assert not use_packed("auto", model, cuda_ids)  # 64 wide: too narrow for "auto"
    assert len(walks) == 1
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert layers and sorted(map(id, varlen._walk(model).checkpointed)) == sorted(map(id, layers))
    walks.clear()
    with varlen.packed_attention(model):
        assert all(m._gradient_checkpointing_func.func is varlen._checkpoint_within for m in layers)
    assert len(walks) == 1


def test_the_walk_needs_no_distributed_build(tokenizer, monkeypatch):
    """On a torch build without distributed support (``torch.distributed.fsdp`` does not import) the walk
    still finds the configs and finds no FSDP2 module."""
    import sys

    from rlhf_kit.models import varlen

    model = make_causal_lm(tokenizer)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # makes the import raise ImportError
    found = varlen._walk(model)
    assert found.fsdp is None and list(found.configs) == [id(model.config)]


def test_sft_loss_of_a_host_batch_finds_the_row_boundaries_on_the_host(tokenizer, monkeypatch):
    """``lm_loss(..., device=)`` takes the collator's host batch: the packed row's boundaries come from the
    host position ids (no read of the device), the copy goes to the device, and the loss is the same."""
    import rlhf_kit.models.varlen as varlen
    from rlhf_kit.data import PackedSFTCollator
    from rlhf_kit.training import evaluation

    examples = [{"input_ids": list(range(3, 3 + n)), "labels": [-100, *range(4, 3 + n)]} for n in (5, 2, 7)]
    host = PackedSFTCollator()(examples)
    model = make_causal_lm(tokenizer, seed=4).double()
    want = evaluation.lm_loss(model, host, num_items=11.0, packed="on")
    moved, seen = [], []
    monkeypatch.setattr(evaluation, "batch_to_device", lambda b, d: moved.append({k: v.clone() for k, v in b.items()}) or moved[-1])  # fmt: skip
    real = varlen.packed_row_kwargs
    monkeypatch.setattr(varlen, "packed_row_kwargs", lambda pos, **kw: seen.append(pos) or real(pos, **kw))
    got = evaluation.lm_loss(model, host, num_items=11.0, packed="on", device="cpu")
    assert len(moved) == 1 and len(seen) == 1
    assert seen[0] is host["position_ids"] and seen[0] is not moved[0]["position_ids"]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
