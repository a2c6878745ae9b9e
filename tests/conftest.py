"""Shared fixtures: a BPE tokenizer trained on the shipped HH sample and tiny models of each family."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels (rlhf_kit.generation.decode_kernel) run on CPU tensors only in Triton's interpreter, which
# triton.jit selects when the kernel is defined: set it before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

from rlhf_kit.tiny import FAMILIES, hh_texts, tiny_config_for, train_tokenizer  # noqa: E402

torch.set_num_threads(2)
# Every gloo group in the tests talks over loopback. Left unset, gloo binds the interface the host name
# resolves to; on a sandboxed CI runner that pair can fail in gloo's background thread, which ends the
# rank with std::terminate (SIGABRT, "terminate called without an active exception") instead of an
# exception. Spawned ranks inherit this from the pytest process.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(scope="session")
def tokenizer():
    """Right-padding byte-level BPE (vocab 512, pad != eos) trained on 1,000 HH dialogues."""
    return train_tokenizer(hh_texts(1000), vocab_size=512)


@pytest.fixture(scope="session")
def left_tokenizer(tokenizer):
    tok = train_tokenizer(hh_texts(1000), vocab_size=512, padding_side="left")
    return tok


@pytest.fixture(scope="session")
def hh_processed():
    """``(comparisons, prompts, counts)`` of the shipped HH sample."""
    from rlhf_kit import default_hh_file
    from rlhf_kit.data.hh import process_hh_file

    return process_hh_file(default_hh_file())


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def make_causal_lm(tokenizer, family="llama", seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config_for(tokenizer, family, **kw)).eval()


def make_reward_model(tokenizer, family="llama", seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(
        tiny_config_for(tokenizer, family, num_labels=1, **kw)
    ).eval()


@pytest.fixture(autouse=True)
def _restore_sdpa_backends():
    """make_accelerator and some tests flip the process-wide cuDNN SDPA switch; each test starts where the
    last one found it."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)
