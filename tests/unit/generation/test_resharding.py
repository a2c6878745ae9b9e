"""Weight resharding: FSDP2 (2 gloo processes) streaming == plain state dict, LoRA merged on the fly,
engine names, TP splits that re-concatenate to the original and reproduce the unsplit layer outputs."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rlhf_kit.generation.resharding import (
    HeadLayout,
    _dim0_sharded,
    iter_full_params,
    reshard_for_tp,
    split_kind,
    split_qkv,
    to_engine_names,
    tp_split,
)
from rlhf_kit.tiny import tiny_config
from tests.gloo import spawn_ranks

VOCAB = 97  # odd on purpose: FSDP2 shards unevenly, vocab-parallel splits need padding


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config("llama", VOCAB, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, **kw)
    return AutoModelForCausalLM.from_config(cfg)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():  # B starts at zero: make the merge non-trivial
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft


def _engine_reference(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Unsplit engine tensors (tp_size 1) from a plain HF state dict."""
    return dict(reshard_for_tp(state.items(), "llama", cfg, 0, 1))


def _concat_shards(name: str, shards: list[torch.Tensor], heads: HeadLayout, full_rows: int) -> torch.Tensor:
    kind = split_kind(name)
    if kind == "replicate" or (kind == "row" and shards[0].dim() == 1):
        assert all(torch.equal(s, shards[0]) for s in shards)
        return shards[0]
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind in ("column", "vocab"):
        return torch.cat(shards, dim=0)[:full_rows]
    d, size = heads.head_dim, len(shards)
    per_q = heads.num_heads // size * d
    per_kv = (heads.num_kv_heads // size if heads.num_kv_heads % size == 0 else 1) * d
    qs = [s[:per_q] for s in shards]
    ks = [s[per_q : per_q + per_kv] for s in shards]
    vs = [s[per_q + per_kv :] for s in shards]
    if heads.num_kv_heads % size == 0:
        k, v = torch.cat(ks), torch.cat(vs)
    else:  # replicated KV heads: take one copy of each
        step = size // heads.num_kv_heads
        k, v = torch.cat(ks[::step]), torch.cat(vs[::step])
    return torch.cat([torch.cat(qs), k, v])


def _worker(rank: int) -> None:
    from rlhf_kit.training.fsdp import apply_fsdp2

    ref = _tiny()
    expected = {n: p.detach().clone() for n, p in ref.named_parameters()}
    sharded = apply_fsdp2(copy.deepcopy(ref))
    assert all(_dim0_sharded(p) for p in sharded.parameters())  # the batched-gather path runs
    for bucket in (1, 4096, 1 << 30):  # one tensor per bucket, several, everything at once
        got = dict(iter_full_params(sharded, bucket_bytes=bucket))
        assert list(got) == list(expected), bucket
        for n, t in expected.items():
            assert torch.equal(got[n], t), (bucket, n)

    peft = _lora(_tiny(seed=1))
    merged = copy.deepcopy(peft).merge_and_unload()
    merged_sd = {n: p.detach() for n, p in merged.named_parameters()}
    got = dict(iter_full_params(apply_fsdp2(copy.deepcopy(peft)), bucket_bytes=8192))
    assert set(got) == set(merged_sd)
    for n, t in merged_sd.items():
        assert torch.allclose(got[n], t, atol=1e-6), n
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], _tiny(seed=1).state_dict()[
        "model.layers.0.self_attn.q_proj.weight"
    ])  # fmt: skip

    # TP=2 shards straight from the FSDP stream; all ranks' shards re-concatenate to the unsplit engine
    cfg = ref.config
    mine = dict(reshard_for_tp(iter_full_params(sharded, bucket_bytes=4096), "llama", cfg, rank, 2))
    both = [None, None]
    dist.all_gather_object(both, mine)
    engine = _engine_reference(expected, cfg)
    heads = HeadLayout.from_config(cfg)
    assert set(both[0]) == set(engine)
    for name, full in engine.items():
        rebuilt = _concat_shards(name, [both[0][name], both[1][name]], heads, full.shape[0])
        assert torch.equal(rebuilt, full), name


def test_fsdp2_streaming_lora_merge_and_tp_shards(tmp_path):
    spawn_ranks(_worker, str(tmp_path / "store"))


def test_plain_model_streaming_and_lora_names():
    ref = _tiny()
    assert {n: t for n, t in iter_full_params(ref, bucket_bytes=1000)}.keys() == dict(
        ref.named_parameters()
    ).keys()
    peft = _lora(_tiny(seed=2))
    names = [n for n, _ in iter_full_params(peft)]
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert not any("lora" in n or "base_layer" in n or n.startswith("base_model") for n in names)
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(iter_full_params(ref, bucket_bytes=0))


def test_engine_names():
    assert to_engine_names("model.embed_tokens.weight", "llama") == "transformer.vocab_embedding.weight"
    assert to_engine_names("model.layers.3.self_attn.k_proj.weight", "qwen2") == (
        "transformer.layers.3.attention.qkv.weight"
    )
    assert (
        to_engine_names("model.layers.3.self_attn.v_proj.bias", "qwen2")
        == "transformer.layers.3.attention.qkv.bias"
    )
    assert (
        to_engine_names("model.layers.0.mlp.gate_proj.weight", "mistral")
        == "transformer.layers.0.mlp.fc.weight"
    )
    assert (
        to_engine_names("model.layers.0.mlp.up_proj.weight", "llama")
        == "transformer.layers.0.mlp.gate.weight"
    )
    assert (
        to_engine_names("model.layers.0.mlp.down_proj.weight", "llama")
        == "transformer.layers.0.mlp.proj.weight"
    )
    assert to_engine_names("model.layers.2.self_attn.o_proj.weight", "llama").endswith(
        "attention.dense.weight"
    )
    assert to_engine_names("model.layers.2.post_attention_layernorm.weight", "llama").endswith(
        "post_layernorm.weight"
    )
    assert to_engine_names("model.norm.weight", "llama") == "transformer.ln_f.weight"
    with pytest.raises(ValueError, match="family"):
        to_engine_names("transformer.h.0.attn.c_attn.weight", "gpt2")
    with pytest.raises(ValueError, match="no TensorRT-LLM name"):
        to_engine_names("model.layers.0.self_attn.rotary.inv_freq", "llama")


def test_tp_split_reproduces_unsplit_layer_outputs():
    """Column/row identities on a real layer: the MLP and the fused-QKV projections of a tiny llama."""
    torch.manual_seed(0)
    model = _tiny(num_layers=1).double()
    layer = model.model.layers[0]
    x = torch.randn(5, 32, dtype=torch.float64)
    for tp in (2, 4):
        # MLP: gate/up column-parallel, down row-parallel -> sum of partial outputs == full output
        full = layer.mlp(x)
        partial = 0
        for r in range(tp):
            g = tp_split("fc", layer.mlp.gate_proj.weight, r, tp, "column")
            u = tp_split("gate", layer.mlp.up_proj.weight, r, tp, "column")
            d = tp_split("proj", layer.mlp.down_proj.weight, r, tp, "row")
            partial = partial + (F.silu(x @ g.T) * (x @ u.T)) @ d.T
        assert torch.allclose(partial, full, atol=1e-12)
        # attention projections: each rank's fused qkv gives exactly its heads of q, k, v
        att = layer.self_attn
        heads = HeadLayout.from_config(model.config)
        q, k, v = x @ att.q_proj.weight.T, x @ att.k_proj.weight.T, x @ att.v_proj.weight.T
        fused = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        d = heads.head_dim
        for r in range(tp):
            w = tp_split("qkv", fused, r, tp, "qkv", heads)
            assert torch.equal(
                w, split_qkv(att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, heads, r, tp)
            )
            out = x @ w.T
            nq = heads.num_heads // tp * d
            kv_head = (
                r * heads.num_kv_heads // tp if heads.num_kv_heads >= tp else r // (tp // heads.num_kv_heads)
            )
            assert torch.allclose(out[:, :nq], q[:, r * nq : (r + 1) * nq])
            assert torch.allclose(out[:, nq : nq + d], k[:, kv_head * d : (kv_head + 1) * d])
            assert torch.allclose(out[:, -d:], v[:, kv_head * d : (kv_head + 1) * d])
        # o_proj is row parallel over the attention heads
        ctx = torch.randn(5, heads.num_heads * d, dtype=torch.float64)
        o = sum(
            ctx[:, r * ctx.shape[1] // tp : (r + 1) * ctx.shape[1] // tp]
            @ tp_split("dense", att.o_proj.weight, r, tp, "row").T
            for r in range(tp)
        )
        assert torch.allclose(o, ctx @ att.o_proj.weight.T, atol=1e-12)
    # vocab-parallel embedding rows are zero padded to a multiple of tp
    emb = model.model.embed_tokens.weight
    shards = [tp_split("emb", emb, r, 2, "vocab") for r in range(2)]
    assert shards[0].shape[0] == 49 and torch.equal(torch.cat(shards)[:VOCAB], emb)
    with pytest.raises(ValueError, match="not divisible"):
        tp_split("fc", layer.mlp.gate_proj.weight, 0, 5, "column")
    with pytest.raises(ValueError, match="neither split"):
        split_qkv(att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, HeadLayout(6, 4, 8), 0, 3)


def _tp_generation_worker(rank: int, workdir: str) -> None:
    """Weights trained under FSDP2 stream into an HF tensor-parallel model (``tp_plan="auto"``, TP=2
    over the same 2 ranks); its greedy generations equal a single-process model with the same weights."""
    from rlhf_kit.generation import HFBackend, SamplingParams
    from rlhf_kit.training.fsdp import apply_fsdp2

    path = os.path.join(workdir, "init")
    if rank == 0:
        _tiny(seed=3).save_pretrained(path)
    dist.barrier()
    trained = apply_fsdp2(AutoModelForCausalLM.from_pretrained(path))
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)  # the training side moves away from `init`
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    trained(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    full = dict(iter_full_params(trained))

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")  # as torchrun sets them
    tp = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")  # sharded with the initial weights
    q = tp.model.layers[0].self_attn.q_proj.weight
    assert hasattr(q, "device_mesh") and q.to_local().shape[0] == q.shape[0] // 2  # really split
    backend = HFBackend(tp)
    assert backend.update_weights(full.items()) == len(full)

    single = _tiny(seed=99)  # different init: every weight must come from the stream
    single.load_state_dict(full, strict=False)
    prompt = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    params = SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True, pad_token_id=0)
    got = backend.generate(prompt, mask, params).sequences
    want = HFBackend(single).generate(prompt, mask, params).sequences
    assert torch.equal(got, want), (got, want)
    init = HFBackend(AutoModelForCausalLM.from_pretrained(path)).generate(prompt, mask, params).sequences
    assert not torch.equal(init, want)  # the refit mattered


def test_tp2_generation_from_fsdp2_weights_equals_single_process(tmp_path):
    spawn_ranks(functools.partial(_tp_generation_worker, workdir=str(tmp_path)), str(tmp_path / "store"))
