"""Comparison and prompt files: reading, validating and writing JSONL (plain or gzip).

Comparison files come in three shapes, detected from the first record and then required on every line:

* NeMo-Aligner: one ``{"text": prompt + response}`` per line, the chosen line directly before its
  rejected line (so an even number of records).
* Prompt/chosen/rejected: ``{"prompt": ..., "chosen": ..., "rejected": ...}``. With strings the texts
  are ``prompt + chosen`` and ``prompt + rejected``; with chat-message lists the prompt messages are put
  before each response (a string response becomes one assistant message).
* Chosen/rejected only: ``{"chosen": ..., "rejected": ...}`` with full texts or full message lists.

Prompt files hold ``{"text": str}``, ``{"prompt": str | messages}`` or ``{"messages": messages}``.
A *text* is therefore ``str | list[dict]`` (:data:`Text`); message lists are rendered with the
tokenizer's chat template when tokenised (see :func:`rlhf_kit.data.tokenize.render`).

Every problem is a ``ValueError`` naming the file, the 1-based line and the field. Blank lines carry no
record and are skipped (line numbers still count them).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

#: A text is a plain string or a list of chat messages ``{"role": str, "content": str}``.
Text: TypeAlias = str | list[dict[str, Any]]

#: Which record shape a comparison file uses.
NEMO, PAIR = "nemo", "pair"


def _open_text(path: str | os.PathLike, mode: str = "rt"):
    if str(path).endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a ``.jsonl`` / ``.jsonl.gz`` file.

    Raises ``ValueError`` naming the file and line for a line that is not JSON or not a JSON object.
    """
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically (temp file in the same folder, then ``os.replace``).

    Returns the number of records written. A ``.gz`` suffix writes gzip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; output files are ordinary readable files
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(tmp, "wt", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


def check_messages(value: Any, where: str, field: str) -> list[dict[str, Any]]:
    """Validate a chat-message list (non-empty; each a dict with string ``role`` and ``content``)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of chat messages")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f"{where}: field {field!r} message {i} must be an object with string 'role' and 'content'"
            )
    return value


def _text_field(record: dict[str, Any], field: str, where: str, allow_messages: bool) -> Text:
    if field not in record:
        raise ValueError(f"{where}: missing field {field!r}")
    value = record[field]
    if isinstance(value, str):
        return value
    if allow_messages and isinstance(value, list):
        return check_messages(value, where, field)
    kind = "a string or a list of chat messages" if allow_messages else "a string"
    raise ValueError(f"{where}: field {field!r} must be {kind}, got {type(value).__name__}")


def comparison_format(record: dict[str, Any], where: str) -> str:
    """Which shape (``NEMO`` or ``PAIR``) a comparison record has; ``ValueError`` if neither."""
    if "chosen" in record or "rejected" in record:
        return PAIR
    if "text" in record:
        return NEMO
    raise ValueError(f"{where}: missing field 'text' (or 'chosen'/'rejected' for pair records)")


def nemo_text(record: dict[str, Any], where: str) -> str:
    """The ``text`` string of a NeMo-format record."""
    return _text_field(record, "text", where, allow_messages=False)  # type: ignore[return-value]


def pair_from_record(record: dict[str, Any], where: str) -> tuple[Text, Text]:
    """``(chosen, rejected)`` texts of a ``{"prompt"?, "chosen", "rejected"}`` record."""
    chosen = _text_field(record, "chosen", where, allow_messages=True)
    rejected = _text_field(record, "rejected", where, allow_messages=True)
    if record.get("prompt") is None:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise ValueError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both messages")
        return chosen, rejected
    prompt = _text_field(record, "prompt", where, allow_messages=True)
    return _join(prompt, chosen, where, "chosen"), _join(prompt, rejected, where, "rejected")


def _join(prompt: Text, response: Text, where: str, field: str) -> Text:
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise ValueError(f"{where}: field {field!r} must be a string when 'prompt' is a string")
        return prompt + response
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    return list(prompt) + list(response)


def prompt_from_record(record: dict[str, Any], where: str) -> Text:
    """The prompt of a prompt-file record: ``text`` (string), ``prompt`` or ``messages``."""
    if "text" in record:
        return _text_field(record, "text", where, allow_messages=False)
    if "prompt" in record:
        return _text_field(record, "prompt", where, allow_messages=True)
    if "messages" in record:
        return check_messages(record["messages"], where, "messages")
    raise ValueError(f"{where}: missing field 'text' (or 'prompt' / 'messages')")


def load_comparisons(path: str | os.PathLike) -> list[tuple[Text, Text]]:
    """Read a comparison file into ``(chosen, rejected)`` text pairs (formats: see module docstring).

    Raises ``ValueError`` (file, 1-based line, field) for a line that is not JSON, a missing or
    wrongly typed field, a record of a different shape than the first, an odd number of NeMo lines
    (the last chosen line has no rejected partner) and an empty file.
    """
    pairs: list[tuple[Text, Text]] = []
    shape: str | None = None
    pending: tuple[int, str] | None = None  # NeMo chosen line waiting for its rejected partner
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        this = comparison_format(record, where)
        if shape is None:
            shape = this
        elif this != shape:
            expected = "'text'" if shape == NEMO else "'chosen'/'rejected'"
            raise ValueError(
                f"{where}: record shape differs from the first record's (expected field {expected})"
            )
        if shape == PAIR:
            pairs.append(pair_from_record(record, where))
        elif pending is None:
            pending = (lineno, nemo_text(record, where))
        else:
            pairs.append((pending[1], nemo_text(record, where)))
            pending = None
    if shape is None:
        raise ValueError(f"{path}: empty file (no records)")
    if pending is not None:
        raise ValueError(
            f"{path}:{pending[0]}: odd number of 'text' lines: this chosen line has no rejected partner line"
        )
    return pairs


def load_prompts(path: str | os.PathLike) -> list[Text]:
    """Read a prompt file (``{"text"}``, ``{"prompt"}`` or ``{"messages"}`` per line) into texts.

    Raises ``ValueError`` (file, 1-based line, field) on bad lines and for an empty file.
    """
    prompts = [prompt_from_record(record, f"{path}:{lineno}") for lineno, record in iter_jsonl(path)]
    if not prompts:
        raise ValueError(f"{path}: empty file (no records)")
    return prompts


def write_comparisons(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> int:
    """Write ``(chosen, rejected)`` string pairs in the NeMo format (chosen line first). Returns pairs."""

    def records():
        for chosen, rejected in pairs:
            yield {"text": chosen}
            yield {"text": rejected}

    return write_jsonl(path, records()) // 2


def write_prompts(path: str | os.PathLike, prompts: Iterable[str]) -> int:
    """Write prompts as ``{"text": prompt}`` lines. Returns the number written."""
    return write_jsonl(path, ({"text": p} for p in prompts))
