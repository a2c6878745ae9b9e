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


def real_like_chat_batch(path: str):
    """A checkpoint set up like a real one (``save_real_like_checkpoint`` with pad == EOS) saved at ``path``
    and loaded back in bf16, two left-padded ChatML prompts and greedy sampling settings that stop at its
    EOS: ``(model, enc, params)``. Asserts the traits it stands for: pad == EOS in the tokenizer, a config
    pad id that differs from it, attention dropout."""
    from transformers import AutoTokenizer

    from rlhf_kit.generation import SamplingParams
    from rlhf_kit.tiny import save_real_like_checkpoint

    save_real_like_checkpoint(path, pad="eos")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    assert tok.pad_token_id == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert model.config.pad_token_id != tok.pad_token_id and model.config.attention_dropout > 0
    enc = tok(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nHow do I bake bread?"
               "<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt", padding=True)  # fmt: skip
    params = SamplingParams(
        max_new_tokens=8, greedy=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model, enc, params


@pytest.fixture(autouse=True)
def _restore_sdpa_backends():
    """make_accelerator and some tests flip the process-wide cuDNN SDPA switch; each test starts where the
    last one found it."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


class HostReads(list):
    """``(name, caller's file)`` of each read of a tensor's value on the host (:func:`host_reads`)."""

    def ours(self) -> list[str]:
        """The names of the reads made by rlhf_kit's own code (not transformers', not the test's)."""
        import rlhf_kit

        package = os.path.dirname(os.path.abspath(rlhf_kit.__file__)) + os.sep
        return [name for name, where in self if os.path.abspath(where).startswith(package)]


@pytest.fixture
def host_reads(monkeypatch) -> HostReads:
    """Counts every read of a tensor's value on the host: ``item``, ``tolist``, ``float()``, ``int()`` and
    ``bool()`` (on a GPU each waits until the device has run everything queued before it)."""
    import sys

    reads = HostReads()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(t, *a, _real=real, _name=name, **k):
            reads.append((_name, sys._getframe(1).f_code.co_filename))
            return _real(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads
