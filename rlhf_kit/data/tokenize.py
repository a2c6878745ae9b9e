"""Tokenising comparisons, prompts and SFT examples, with explicit, reported length policies.

* Comparison texts get EOS appended (the reward model reads its score at the last token). Pairs where
  either side is longer than ``max_length`` are dropped (``too_long="drop"``) or cut to
  ``max_length - 1`` tokens plus EOS (``"truncate"``); a :class:`TokenizeReport` counts them and a
  warning is logged whenever any pair is affected.
* Prompts are left-truncated (the end of the dialogue, where the model continues, is kept), counted.
* SFT examples are ``prompt + response + EOS`` with ``labels = -100`` on the prompt tokens.

Strings are tokenised with the tokenizer's own special tokens (e.g. a BOS); chat-message lists are
rendered with the chat template first and then tokenised without adding special tokens again.

"EOS" here is the token a response ends with (:func:`rlhf_kit.data.tokenizer.response_end_id`): the chat
template's end-of-turn token when the tokenizer has a template (``<|im_end|>``, ``<|eot_id|>``), else
``eos_token``. A rendered conversation is cut right after its last end-of-turn token (templates add a
newline after it), so a reward model reads its score where a PPO response ends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlhf_kit.data.formats import Text
from rlhf_kit.data.tokenizer import response_end_id

logger = logging.getLogger("rlhf_kit.data")

IGNORE_INDEX = -100
TooLong = Literal["drop", "truncate"]


def render(text: Text, tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """A text as a string: message lists through the tokenizer's chat template, strings unchanged."""
    if isinstance(text, str):
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat-message data needs a tokenizer with a chat template (tokenizer.chat_template is not set)"
        )
    return tokenizer.apply_chat_template(text, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(text: Text, tokenizer: Any, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a text (see :func:`render`); special tokens added only for plain strings."""
    return encode_many([text], tokenizer, add_generation_prompt)[0]


def encode_many(
    texts: Sequence[Text], tokenizer: Any, add_generation_prompt: bool = False
) -> list[list[int]]:
    """:func:`encode` of each text, in order, with one tokenizer call per kind (plain strings, rendered message
    lists): a fast tokenizer encodes a batch in Rust, in parallel where it may (1.8x faster than text by
    text for the 2,069 shipped HH prompts on 2 cores)."""
    out: list[list[int]] = [[] for _ in texts]
    for plain in (True, False):
        at = [i for i, t in enumerate(texts) if isinstance(t, str) == plain]
        if at:
            rendered = [render(texts[i], tokenizer, add_generation_prompt) for i in at]
            for i, ids in zip(at, tokenizer(rendered, add_special_tokens=plain)["input_ids"], strict=True):
                out[i] = list(ids)
    return out


def require_eos_id(tokenizer: Any) -> int:
    """The id comparison and SFT sequences end with (see the module doc)."""
    return response_end_id(tokenizer)


def cut_after_last(ids: list[int], end_id: int) -> list[int]:
    """``ids`` up to and including the last ``end_id`` (unchanged if it does not occur)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == end_id:
            return ids[: i + 1]
    return ids


def check_length_policy(too_long: str, max_length: int) -> None:
    if too_long not in ("drop", "truncate"):
        raise ValueError(f"too_long must be 'drop' or 'truncate', got {too_long!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


@dataclass
class TokenizeReport:
    """What tokenisation did to the examples: how many were kept, dropped, truncated (never silent)."""

    kind: str
    total: int
    kept: int
    dropped: int
    truncated: int
    max_length: int
    too_long: str
    longest: int = 0

    def __str__(self) -> str:
        def pct(n: int) -> str:
            return f"{100.0 * n / self.total:.1f}%" if self.total else "0%"

        return (
            f"tokenised {self.total} {self.kind} (max_length={self.max_length}, too_long={self.too_long}): "
            f"kept {self.kept}, dropped {self.dropped} ({pct(self.dropped)}), "
            f"truncated {self.truncated} ({pct(self.truncated)}), longest {self.longest} tokens"
        )

    def log(self) -> TokenizeReport:
        """Log the report: a warning if anything was dropped or truncated, else info. Returns self."""
        level = logging.WARNING if (self.dropped or self.truncated) else logging.INFO
        logger.log(level, "%s", self)
        return self


def fit_pair(
    chosen: list[int], rejected: list[int], eos_id: int, max_length: int, too_long: str
) -> tuple[list[int], list[int], bool] | None:
    """Append EOS to both sides and apply the length policy.

    Returns ``(chosen_ids, rejected_ids, truncated)`` or ``None`` when the pair is dropped.
    """
    chosen = _with_eos(chosen, eos_id)
    rejected = _with_eos(rejected, eos_id)
    if len(chosen) <= max_length and len(rejected) <= max_length:
        return chosen, rejected, False
    if too_long == "drop":
        return None
    return _cut(chosen, eos_id, max_length), _cut(rejected, eos_id, max_length), True


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def _cut(ids: list[int], eos_id: int, max_length: int) -> list[int]:
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [eos_id]


def tokenize_pairs(
    pairs: Sequence[tuple[Text, Text]], tokenizer: Any, max_length: int, too_long: TooLong = "drop"
) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenise ``(chosen, rejected)`` pairs into ``{"chosen_input_ids", "rejected_input_ids"}`` examples.

    EOS is appended to each side. Pairs where a side exceeds ``max_length`` are dropped or truncated
    (keeping the start, ending in EOS) per ``too_long``; the report counts them and is logged.
    """
    check_length_policy(too_long, max_length)
    eos = require_eos_id(tokenizer)
    examples: list[dict[str, list[int]]] = []
    dropped = truncated = longest = 0
    ids = encode_many([t for pair in pairs for t in pair], tokenizer)
    for (chosen, _), c, r in zip(pairs, ids[0::2], ids[1::2], strict=True):
        if _is_messages(chosen):
            c, r = cut_after_last(c, eos), cut_after_last(r, eos)
        longest = max(longest, len(c) + 1, len(r) + 1)
        fitted = fit_pair(c, r, eos, max_length, too_long)
        if fitted is None:
            dropped += 1
            continue
        truncated += fitted[2]
        examples.append({"chosen_input_ids": fitted[0], "rejected_input_ids": fitted[1]})
    report = TokenizeReport(
        "pairs", len(pairs), len(examples), dropped, truncated, max_length, too_long, longest
    )
    return examples, report.log()


def left_truncate(ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """Keep the last ``max_length`` tokens (the end of the dialogue). Returns ``(ids, was_truncated)``."""
    return (ids[-max_length:], True) if len(ids) > max_length else (ids, False)


def tokenize_prompts(prompts: Sequence[Text], tokenizer: Any, max_length: int) -> tuple[list[list[int]], int]:
    """Tokenise prompts for generation; message lists get the generation prompt appended.

    Prompts longer than ``max_length`` are left-truncated. Returns ``(ids, n_truncated)`` and logs a
    warning when ``n_truncated > 0``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    out: list[list[int]] = []
    n_truncated = longest = 0
    for ids in encode_many(prompts, tokenizer, add_generation_prompt=True):
        longest = max(longest, len(ids))
        ids, cut = left_truncate(ids, max_length)
        n_truncated += cut
        out.append(ids)
    TokenizeReport(
        "prompts", len(prompts), len(out), 0, n_truncated, max_length, "left-truncate", longest
    ).log()
    return out, n_truncated


def _is_messages(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(m, dict) for m in item)


def split_sft_item(item: Any, tokenizer: Any, response_marker: str | None) -> tuple[str, str]:
    """An SFT item as ``(prompt, response)`` strings.

    ``item`` is a ``(prompt, response)`` pair of strings; a message list (its last message the
    assistant's response, the rest rendered with the generation prompt); or a full string, split after
    the last ``response_marker`` (``None``: the whole string is the response).
    """
    if isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0], item[1]
    if _is_messages(item):
        if item[-1].get("role") != "assistant":
            raise ValueError("an SFT message list must end with an assistant message")
        prompt = render(item[:-1], tokenizer, add_generation_prompt=True)
        full = render(item, tokenizer)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt, full[len(prompt) :]
    if isinstance(item, str):
        if response_marker is None:
            return "", item
        i = item.rfind(response_marker)
        if i < 0:
            raise ValueError(f"SFT text has no response marker {response_marker!r}: {item[:80]!r}")
        cut = i + len(response_marker)
        return item[:cut], item[cut:]
    raise ValueError(f"unsupported SFT item of type {type(item).__name__}")


def tokenize_sft(
    items: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    too_long: TooLong = "truncate",
    response_marker: str | None = "Assistant:",
) -> tuple[list[dict[str, list[int]]], TokenizeReport]:
    """Tokenise SFT examples into ``{"input_ids", "labels"}`` with ``labels = -100`` on prompt tokens.

    Items: see :func:`split_sft_item` (``(prompt, response)`` pairs, message lists, or strings split at
    ``response_marker``). ``input_ids = prompt + response + EOS``; the loss covers response and EOS.
    Too long: ``"truncate"`` keeps the first ``max_length`` tokens (no EOS: the response was cut) and
    drops examples with no response token left; ``"drop"`` drops them. All counted in the report.
    """
    check_length_policy(too_long, max_length)
    eos = require_eos_id(tokenizer)
    examples: list[dict[str, list[int]]] = []
    dropped = truncated = longest = 0
    for item in items:
        prompt, response = split_sft_item(item, tokenizer, response_marker)
        # Chat-template renderings carry their own special tokens; a BOS belongs at the very start only.
        specials = not _is_messages(item)
        p_ids = list(tokenizer(prompt, add_special_tokens=specials)["input_ids"]) if prompt else []
        r_ids = list(tokenizer(response, add_special_tokens=specials and not p_ids)["input_ids"])
        r_ids = _with_eos(cut_after_last(r_ids, eos) if not specials else r_ids, eos)
        ids = p_ids + r_ids
        labels = [IGNORE_INDEX] * len(p_ids) + r_ids
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            if too_long == "drop" or len(p_ids) >= max_length:
                dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        examples.append({"input_ids": ids, "labels": labels})
    report = TokenizeReport(
        "SFT examples", len(items), len(examples), dropped, truncated, max_length, too_long
    )
    report.longest = longest
    return examples, report.log()
