"""Tokenizers as real checkpoints ship them: no pad token, pad == EOS, a chat template whose end-of-turn
token is not the tokenizer's EOS.

rlhf_kit never needs a pad token distinct from EOS: scores and values are read at the last position of
the attention mask (:func:`rlhf_kit.models.reward.reward_scores`) and responses end at their first stop
token, so padding only has to be *some* id. What matters is which token ends a response:

* :func:`end_of_turn_id` finds the token the chat template closes an assistant turn with
  (``<|im_end|>`` for SmolLM2 / Qwen, ``<|eot_id|>`` for Llama 3), which need not be ``eos_token``
  (SmolLM2's GGUF tokenizer under transformers 5.17 says EOS is ``<|im_start|>``);
* :func:`response_end_id` is the token comparison and SFT sequences end with and PPO's reward model
  reads its score at: the end-of-turn token when there is a chat template, else EOS;
* :func:`stop_token_ids` are the ids generation stops at: that token and EOS.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("rlhf_kit.data")

_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "rlhfkitprobe"}]


def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token one (EOS, else UNK), in memory. Returns what was done, or None.

    Safe because nothing in rlhf_kit locates sequence ends through the pad id (see the module doc).
    """
    if tokenizer.pad_token_id is not None:
        return None
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            tokenizer.pad_token = token
            note = f"the tokenizer has no pad token; padding with its {name.split('_')[0].upper()} {token!r}"
            logger.info("%s", note)
            return note
    raise ValueError("the tokenizer has neither a pad, an EOS nor an UNK token to pad with")


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template puts right after an assistant message, or None.

    Found by rendering a probe conversation: the first special token after the assistant's content.
    None when the tokenizer has no chat template or the template closes turns with plain text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    cut = text.find(_PROBE[-1]["content"])
    if cut < 0:
        return None
    tail = text[cut + len(_PROBE[-1]["content"]) :]
    special = _special_ids(tokenizer)
    for i in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if i in special:
            return int(i)
    return None


def response_end_id(tokenizer: Any) -> int:
    """The id a response ends with: the chat template's end-of-turn token if any, else EOS."""
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        return eot
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token_id and no chat template; responses need an end token"
        )
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a generated response: :func:`response_end_id` first, then EOS if different."""
    ids = [response_end_id(tokenizer)]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def load_tokenizer(path: str, padding_side: str = "right", **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (:func:`ensure_pad_token`) and the given
    padding side; the recipes' one way to get a tokenizer from a checkpoint."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    tokenizer.padding_side = padding_side
    note = ensure_pad_token(tokenizer)
    if note:
        print(f"{path}: {note}")
    return tokenizer
