"""Tiny models and tokenizers built offline, for the embedded defaults, tests and examples.

Nothing here downloads: the tokenizer is a byte-level BPE trained in about a second on the shipped HH
sample (or any texts), and models are random-init HF configs of 2-4 layers for each decoder family
the library supports.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

from rlhf_kit import default_hh_file

#: Decoder families that every model-facing piece of the library is tested on.
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"

#: A minimal chat template (User/Assistant turns, the HH rendering) for chat-message data.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if m['role'] == 'user' %}User: {% elif m['role'] == 'assistant' %}Assistant: {% else %}System: {% endif %}"
    "{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def hh_texts(limit: int | None = None) -> list[str]:
    """Chosen and rejected dialogues of the shipped HH sample, as raw strings (training corpus)."""
    texts: list[str] = []
    with gzip.open(default_hh_file(), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["chosen"])
            texts.append(row["rejected"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def _train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, special tokens first (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    padding_side: str = "right",
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (pad distinct from EOS, as PPO needs) and wrap it for HF.

    ``texts`` defaults to the shipped HH sample. ``vocab_size`` includes the 3 special tokens.
    """
    tok = _train_bpe(
        texts if texts is not None else hh_texts(), vocab_size, [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        padding_side=padding_side,
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok


def tiny_config(
    family: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    bos_token_id: int = 2,
    **overrides,
) -> PretrainedConfig:
    """A small random-init config of one HF decoder family (dropout off, as PPO wants).

    ``family`` is one of :data:`FAMILIES`. ``overrides`` go to the config unchanged.
    """
    ids = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    if family in ("llama", "mistral", "qwen2"):
        kw = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            attention_dropout=0.0,
        )
    elif family == "gpt2":
        kw = dict(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
        )
    elif family == "gpt_neox":
        kw = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_parallel_residual=True,
        )
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    kw.update(ids)
    kw.update(overrides)
    return AutoConfig.for_model(family, vocab_size=vocab_size, **kw)


def tiny_config_for(tokenizer: PreTrainedTokenizerFast, family: str = "llama", **kwargs) -> PretrainedConfig:
    """:func:`tiny_config` with vocabulary size and special-token ids taken from ``tokenizer``."""
    return tiny_config(
        family,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **kwargs,
    )


def texts_sample(n: int, seed: int = 0) -> Sequence[str]:
    """``n`` HH dialogues picked with a fixed seed (for quick fixtures)."""
    import random

    texts = hh_texts()
    return random.Random(seed).sample(texts, n)


def save_tiny_pretrained(
    output_dir: str,
    kind: str = "causal_lm",
    family: str = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    **config_kwargs,
) -> str:
    """Write a random-init tiny model and its tokenizer as a standard HF directory; returns the path.

    ``kind`` is ``"causal_lm"`` or ``"reward"`` (sequence classification, one label). Used by the
    recipes' embedded defaults when no ``--model`` is given. The tokenizer is saved with left padding
    off (right padding); recipes set the side they need.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = tokenizer or train_tokenizer()
    torch.manual_seed(seed)
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_config(tiny_config_for(tokenizer, family, **config_kwargs))
    elif kind == "reward":
        model = AutoModelForSequenceClassification.from_config(
            tiny_config_for(tokenizer, family, num_labels=1, **config_kwargs)
        )
    else:
        raise ValueError(f"kind must be 'causal_lm' or 'reward', got {kind!r}")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------
# Tiny checkpoints set up the way real hub checkpoints are (SmolLM2-135M-Instruct, Llama 3, Qwen2)

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

#: SmolLM2's ChatML template (with its default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_chat_tokenizer(
    pad: str = "eos", vocab_size: int = 512, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """A ChatML BPE tokenizer set up like SmolLM2-135M-Instruct's, in one of its two observed shapes.

    Special tokens: ``<|endoftext|>`` (0, UNK), ``<|im_start|>`` (1), ``<|im_end|>`` (2).
    ``pad="eos"``: pad == EOS == ``<|im_end|>`` (transformers 5.24). ``pad="none"``: no pad token and
    EOS == ``<|im_start|>`` (transformers 5.17); the end of an assistant turn is then not EOS.
    """
    tok = _train_bpe(
        texts if texts is not None else hh_texts(1000), vocab_size, [ENDOFTEXT, IM_START, IM_END]
    )
    if pad == "eos":
        kw = dict(eos_token=IM_END, pad_token=IM_END, bos_token=IM_START)
    elif pad == "none":
        kw = dict(eos_token=IM_START, bos_token=IM_START)
    else:
        raise ValueError(f"pad must be 'eos' or 'none', got {pad!r}")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=ENDOFTEXT, **kw)
    hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def save_real_like_checkpoint(
    output_dir: str,
    pad: str = "eos",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **config_kwargs,
) -> str:
    """A tiny Llama causal LM saved the way real checkpoints come, for tests of that world:

    bf16 weights; config ``pad_token_id`` 0 (not the tokenizer's pad, cf. SmolLM2's config 2 vs a
    tokenizer padding with 0), ``eos_token_id`` 2, ``bos_token_id`` 1; ``attention_dropout`` 0.3; a
    ``generation_config`` with sampling settings (``repetition_penalty``, ``no_repeat_ngram_size``,
    ``top_k``, ``temperature``); the ChatML tokenizer of :func:`train_chat_tokenizer` (``pad``).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tokenizer or train_chat_tokenizer(pad)
    torch.manual_seed(seed)
    kw = dict(pad_token_id=0, eos_token_id=2, bos_token_id=1, attention_dropout=0.3, tie_word_embeddings=True)
    kw.update(config_kwargs)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), **kw)).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=2, do_sample=True, temperature=0.2, top_k=5,
        repetition_penalty=1.5, no_repeat_ngram_size=2,
    )  # fmt: skip
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
