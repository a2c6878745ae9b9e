"""Anthropic HH-RLHF to comparison and prompt files.

An HH record holds two full dialogues, ``chosen`` and ``rejected``, each ``"\\n\\nHuman: ...\\n\\nAssistant:
..."`` and differing only in the last assistant turn. We rewrite the turns as ``User: ...`` /
``Assistant: ...`` joined by blank lines (``keep_human=True`` keeps ``Human:``), with each turn's
content stripped. The *prompt* is the dialogue up to and including the final ``Assistant:``; the
*response* is ``" " + last assistant turn``, so ``prompt + response`` is the whole rewritten dialogue.
For user/assistant turns this is exactly what the tiny tokenizer's chat template renders.

With ``messages=True`` (for instruct models, which should see their own chat format) the same turns are
kept as chat messages instead: the prompt is the message list before the last assistant turn (``user`` /
``assistant`` roles) and each response the last assistant turn's content; the recipes then render them
with the model's chat template (prompts with the generation prompt, responses ending at the template's
end-of-turn token).

A pair is dropped, and counted under its reason in :class:`DropCounts`, when either side is malformed
(no ``Assistant:`` turn, turns that do not alternate starting with the human, an empty turn), when its
last response is empty, when the chosen and rejected prompts differ, or when both responses are equal.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_kit.data.formats import Text, write_comparisons, write_jsonl, write_prompts

_TURN = re.compile(r"\n\n(Human|Assistant):")

#: Drop reasons, in the order they are checked.
REASONS: tuple[str, ...] = (
    "bad_record",  # not JSON, or chosen/rejected missing or not strings
    "no_assistant_turn",
    "not_alternating",
    "empty_turn",
    "empty_response",
    "prompt_mismatch",
    "identical_responses",
)


class MalformedDialogue(ValueError):
    """An HH dialogue that cannot be split into turns; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class DropCounts:
    """How many HH pairs were read, kept, and dropped (by reason)."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def update(self, other: DropCounts) -> None:
        self.total += other.total
        self.kept += other.kept
        self.dropped.update(other.dropped)

    def __str__(self) -> str:
        head = f"read {self.total} pairs, kept {self.kept}, dropped {self.n_dropped}"
        if not self.dropped:
            return head
        reasons = ", ".join(f"{r}: {self.dropped[r]}" for r in REASONS if self.dropped.get(r))
        return f"{head} ({reasons})"


def parse_turns(dialogue: str) -> list[tuple[str, str]]:
    """Split a raw HH dialogue into ``(role, content)`` turns, role ``"human"`` or ``"assistant"``.

    Content is stripped. Raises :class:`MalformedDialogue` if there is no assistant turn, the turns do
    not alternate human/assistant starting with the human, or a turn before the last is empty.
    """
    parts = _TURN.split(dialogue)
    if parts[0].strip():
        raise MalformedDialogue("not_alternating", "dialogue does not start with a '\\n\\nHuman:' turn")
    roles = [r.lower() for r in parts[1::2]]
    contents = [c.strip() for c in parts[2::2]]
    if "assistant" not in roles:
        raise MalformedDialogue("no_assistant_turn", "dialogue has no '\\n\\nAssistant:' turn")
    if roles[-1] != "assistant" or any(r != ("human", "assistant")[i % 2] for i, r in enumerate(roles)):
        raise MalformedDialogue("not_alternating", f"turns do not alternate Human/Assistant: {roles}")
    if any(not c for c in contents[:-1]):
        raise MalformedDialogue("empty_turn", "a turn before the last one is empty")
    return list(zip(roles, contents))


def split_prompt_response(dialogue: str) -> tuple[str, str]:
    """Split a raw HH dialogue at its final ``\\n\\nAssistant:`` (kept in the prompt), unchanged otherwise.

    ``prompt + response == dialogue``. Raises :class:`MalformedDialogue` if there is no such marker.
    """
    marker = "\n\nAssistant:"
    i = dialogue.rfind(marker)
    if i < 0:
        raise MalformedDialogue("no_assistant_turn", "dialogue has no '\\n\\nAssistant:' turn")
    cut = i + len(marker)
    return dialogue[:cut], dialogue[cut:]


def convert_dialogue(dialogue: str, keep_human: bool = False) -> tuple[str, str]:
    """Rewrite a raw HH dialogue to ``(prompt, response)`` in the ``User:``/``Assistant:`` format.

    The prompt ends with the final ``Assistant:``; the response is ``" " + content`` of the last
    assistant turn (``""`` if that turn is empty). ``keep_human`` labels user turns ``Human:``.
    """
    user = "Human" if keep_human else "User"
    turns = parse_turns(dialogue)
    lines = [f"{user if role == 'human' else 'Assistant'}: {content}" for role, content in turns[:-1]]
    prompt = "\n\n".join(lines + ["Assistant:"])
    last = turns[-1][1]
    return prompt, (" " + last if last else "")


def convert_dialogue_messages(dialogue: str) -> tuple[list[dict[str, str]], str]:
    """A raw HH dialogue as ``(prompt_messages, response)``: the turns before the last as ``user`` /
    ``assistant`` chat messages, and the last assistant turn's content (``""`` if empty)."""
    turns = parse_turns(dialogue)
    prompt = [{"role": "user" if role == "human" else "assistant", "content": c} for role, c in turns[:-1]]
    return prompt, turns[-1][1]


def convert_pair(
    chosen: Any, rejected: Any, keep_human: bool = False, messages: bool = False
) -> tuple[Text, Text, Text]:
    """Convert one HH record to ``(prompt, chosen_text, rejected_text)``.

    ``messages=True``: ``prompt`` is a message list and the two texts are the bare responses.
    Raises :class:`MalformedDialogue` (with its drop ``reason``) when the pair must be dropped.
    """
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise MalformedDialogue("bad_record", "'chosen' and 'rejected' must be strings")
    if messages:
        (prompt_c, resp_c), (prompt_r, resp_r) = (
            convert_dialogue_messages(chosen),
            convert_dialogue_messages(rejected),
        )
    else:
        (prompt_c, resp_c), (prompt_r, resp_r) = (
            convert_dialogue(chosen, keep_human),
            convert_dialogue(rejected, keep_human),
        )
    if not resp_c or not resp_r:
        raise MalformedDialogue("empty_response", "the last assistant turn is empty")
    if prompt_c != prompt_r:
        raise MalformedDialogue("prompt_mismatch", "chosen and rejected dialogues have different prompts")
    if resp_c == resp_r:
        raise MalformedDialogue("identical_responses", "chosen and rejected responses are equal")
    if messages:
        return prompt_c, resp_c, resp_r
    return prompt_c, prompt_c + resp_c, prompt_r + resp_r


def process_hh_records(
    records: Iterable[dict[str, Any] | None], keep_human: bool = False, messages: bool = False
) -> tuple[list[tuple[Text, Text]], list[Text], DropCounts]:
    """Convert HH records (``None`` = an unreadable line) to comparisons, prompts and drop counts.

    ``messages=True``: comparisons are ``(chosen_response, rejected_response)`` and prompts message lists
    (see :func:`convert_pair`); :func:`write_split` writes them as ``prompt``/``chosen``/``rejected``.
    """
    comparisons: list[tuple[Text, Text]] = []
    prompts: list[Text] = []
    counts = DropCounts()
    for record in records:
        counts.total += 1
        if record is None:
            counts.dropped["bad_record"] += 1
            continue
        try:
            prompt, chosen, rejected = convert_pair(
                record.get("chosen"), record.get("rejected"), keep_human, messages
            )
        except MalformedDialogue as e:
            counts.dropped[e.reason] += 1
            continue
        comparisons.append((chosen, rejected))
        prompts.append(prompt)
        counts.kept += 1
    return comparisons, prompts, counts


def _read_raw(path: str | os.PathLike) -> Iterable[dict[str, Any] | None]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            yield record if isinstance(record, dict) else None


def process_hh_file(
    path: str | os.PathLike, keep_human: bool = False, messages: bool = False
) -> tuple[list[tuple[Text, Text]], list[Text], DropCounts]:
    """Read one HH release file (``.jsonl`` or ``.jsonl.gz``).

    Returns ``(comparisons, prompts, counts)``: ``(chosen_text, rejected_text)`` pairs, the prompt of
    each kept pair (same order), and the :class:`DropCounts`. Lines that are not JSON objects count as
    ``bad_record``. ``messages``: see :func:`process_hh_records`.
    """
    return process_hh_records(_read_raw(path), keep_human, messages)


def write_split(
    output_dir: str | os.PathLike,
    split: str,
    comparisons: list[tuple[Text, Text]],
    prompts: list[Text],
    prompts_only: bool = False,
) -> dict[str, str]:
    """Write ``{split}_comparisons.jsonl`` and ``{split}_prompts.jsonl`` atomically; return their paths
    (``prompts_only``: the prompt file alone, for PPO).

    String comparisons are written in the NeMo ``{"text"}`` format and string prompts as ``{"text"}``;
    message-list prompts (``messages=True`` processing) as ``{"prompt": messages, "chosen": response,
    "rejected": response}`` and ``{"messages": messages}``.
    """
    out = Path(output_dir)
    paths = {
        f"{split}_comparisons": str(out / f"{split}_comparisons.jsonl"),
        f"{split}_prompts": str(out / f"{split}_prompts.jsonl"),
    }
    messages = bool(prompts) and not isinstance(prompts[0], str)
    if prompts_only:
        del paths[f"{split}_comparisons"]
    elif messages:
        records = ({"prompt": p, "chosen": c, "rejected": r} for p, (c, r) in zip(prompts, comparisons))
        write_jsonl(paths[f"{split}_comparisons"], records)
    else:
        write_comparisons(paths[f"{split}_comparisons"], comparisons)  # type: ignore[arg-type]
    if messages:
        write_jsonl(paths[f"{split}_prompts"], ({"messages": p} for p in prompts))
    else:
        write_prompts(paths[f"{split}_prompts"], prompts)  # type: ignore[arg-type]
    return paths


def prepare_default_hh(
    output_dir: str | os.PathLike,
    test_fraction: float = 0.1,
    seed: int = 0,
    keep_human: bool = False,
    messages: bool = False,
    prompts_only: bool = False,
) -> dict[str, str]:
    """Process the shipped HH sample (2,312 pairs) and split it into train/test files, offline.

    The kept pairs are shuffled with ``seed`` and the first ``round(test_fraction * n)`` go to test
    (deterministic; each split keeps the file order). Returns ``{"train_comparisons": path,
    "train_prompts": ..., "test_comparisons": ..., "test_prompts": ...}``. The recipes' no-argument
    defaults build their data with this. ``messages=True`` writes chat messages (see the module doc);
    ``prompts_only=True`` writes (and returns) the two prompt files only, as PPO's default needs.
    """
    return prepare_default_hh_with_counts(
        output_dir, test_fraction, seed, keep_human, messages, prompts_only
    )[0]


def prepare_default_hh_with_counts(
    output_dir: str | os.PathLike,
    test_fraction: float = 0.1,
    seed: int = 0,
    keep_human: bool = False,
    messages: bool = False,
    prompts_only: bool = False,
) -> tuple[dict[str, str], DropCounts]:
    """:func:`prepare_default_hh`, also returning the :class:`DropCounts` of the shipped sample."""
    from rlhf_kit import default_hh_file

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    comparisons, prompts, counts = process_hh_file(default_hh_file(), keep_human, messages)
    order = list(range(len(comparisons)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(order)))
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    paths = {}
    for split, rows in (("train", train), ("test", test)):
        picked = [comparisons[i] for i in rows], [prompts[i] for i in rows]
        paths.update(write_split(output_dir, split, *picked, prompts_only=prompts_only))
    return paths, counts
