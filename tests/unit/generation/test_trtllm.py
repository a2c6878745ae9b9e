"""TRTLLMBackend's import guard, and the TensorRT-LLM checkpoint writer (no tensorrt_llm needed)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_kit.generation import TRTLLMBackend
from rlhf_kit.generation.resharding import HeadLayout, reshard_for_tp
from rlhf_kit.generation.trtllm import write_trtllm_checkpoint
from tests.unit.generation.test_resharding import _concat_shards, _tiny


def test_construction_without_tensorrt_llm_raises_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # as if not installed, wherever this runs
    with pytest.raises(ImportError, match=r"pip install rlhf-kit\[trtllm\]"):
        TRTLLMBackend(str(tmp_path))


def test_write_checkpoint_shards_reassemble(tmp_path):
    model = _tiny(seed=3)
    cfg = model.config
    paths = write_trtllm_checkpoint(model, cfg, str(tmp_path), "llama", tp_size=2, dtype=torch.float32)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["architecture"] == "LlamaForCausalLM" and meta["mapping"]["tp_size"] == 2
    assert meta["num_key_value_heads"] == 2 and meta["head_size"] == 8 and meta["vocab_size"] == 97
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    full = dict(reshard_for_tp(model.state_dict().items(), "llama", cfg, 0, 1))
    assert set(ranks[0]) == set(full)
    assert "transformer.layers.1.attention.qkv.weight" in full
    heads = HeadLayout.from_config(cfg)
    for name, t in full.items():
        assert torch.equal(_concat_shards(name, [ranks[0][name], ranks[1][name]], heads, t.shape[0]), t), name
    assert not list(tmp_path.glob(".tmp_*"))
