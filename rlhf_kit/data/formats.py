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

Every problem is a :class:`~rlhf_kit.errors.DataError` (a ``ValueError``) naming the file, the 1-based
line and the field: invalid UTF-8, invalid JSON, a missing, empty or wrongly typed field, a chat role
other than system / user / assistant, records of mixed formats. Gzip is read by content, whatever the
file is called. Blank lines carry no record and are skipped (line numbers still count them).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from rlhf_kit.errors import DataError

logger = logging.getLogger("rlhf_kit.data")

#: A text is a plain string or a list of chat messages ``{"role": str, "content": str}``.
Text: TypeAlias = str | list[dict[str, Any]]

#: Chat roles a message may have (others would render as an unknown speaker).
ROLES = ("system", "user", "assistant")

#: Which record shape a comparison file uses.
NEMO, PAIR = "nemo", "pair"


GZIP_MAGIC = b"\x1f\x8b"


def _open_text(path: str | os.PathLike, mode: str = "rt"):
    if str(path).endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _open_lines(path: str | os.PathLike):
    """A binary line reader for ``path``: gzip when the bytes say so (whatever the name), else plain."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a .jsonl (or .jsonl.gz) file")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    with open(p, "rb") as f:
        magic = f.read(2)
    return gzip.open(p, "rb") if magic == GZIP_MAGIC else open(p, "rb")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a ``.jsonl`` / ``.jsonl.gz`` file.

    Gzip is recognised by its content, not its name. Raises :class:`~rlhf_kit.errors.DataError`
    naming the file (and the line) for a directory, a corrupt gzip stream, a line that is not UTF-8,
    not JSON or not a JSON object.
    """
    lineno = 0
    with _open_lines(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = raw[e.start : e.start + 1]
                    raise DataError(
                        f"{path}:{lineno}: line is not valid UTF-8 (byte {e.start + 1}: {bad!r})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
        except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
            raise DataError(f"{path}:{lineno + 1}: cannot read the gzip stream ({e})") from None


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
        raise DataError(f"{where}: field {field!r} must be a non-empty list of chat messages")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{where}: field {field!r} message {i} must be an object with string 'role' and 'content'"
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: field {field!r} message {i} has role {m['role']!r}; "
                f"expected one of {', '.join(ROLES)}"
            )
    return value


def _text_field(record: dict[str, Any], field: str, where: str, allow_messages: bool) -> Text:
    if field not in record:
        raise DataError(f"{where}: missing field {field!r}")
    value = record[field]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        return value
    if allow_messages and isinstance(value, list):
        return check_messages(value, where, field)
    kind = "a string or a list of chat messages" if allow_messages else "a string"
    raise DataError(f"{where}: field {field!r} must be {kind}, got {type(value).__name__}")


def comparison_format(record: dict[str, Any], where: str) -> str:
    """Which shape (``NEMO`` or ``PAIR``) a comparison record has; ``ValueError`` if neither."""
    if "chosen" in record or "rejected" in record:
        return PAIR
    if "text" in record:
        return NEMO
    raise DataError(f"{where}: missing field 'text' (or 'chosen'/'rejected' for pair records)")


def nemo_text(record: dict[str, Any], where: str) -> str:
    """The ``text`` string of a NeMo-format record."""
    return _text_field(record, "text", where, allow_messages=False)  # type: ignore[return-value]


def pair_from_record(record: dict[str, Any], where: str) -> tuple[Text, Text]:
    """``(chosen, rejected)`` texts of a ``{"prompt"?, "chosen", "rejected"}`` record."""
    chosen = _text_field(record, "chosen", where, allow_messages=True)
    rejected = _text_field(record, "rejected", where, allow_messages=True)
    if record.get("prompt") is None:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both messages")
        return chosen, rejected
    prompt = _text_field(record, "prompt", where, allow_messages=True)
    return _join(prompt, chosen, where, "chosen"), _join(prompt, rejected, where, "rejected")


def _join(prompt: Text, response: Text, where: str, field: str) -> Text:
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise DataError(f"{where}: field {field!r} must be a string when 'prompt' is a string")
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
    raise DataError(f"{where}: missing field 'text' (or 'prompt' / 'messages')")


def prompt_field(record: dict[str, Any]) -> str:
    """Which field carries a prompt record's prompt (``text``, ``prompt`` or ``messages``)."""
    return next((k for k in ("text", "prompt", "messages") if k in record), "")


def sft_item_from_record(record: dict[str, Any], where: str) -> str | tuple[str, str] | list[dict[str, Any]]:
    """One SFT example of a text file: ``{"text"}`` (a string), ``{"prompt", "response"}`` (a pair of
    strings) or ``{"messages"}`` (a chat); the field names the format, as in :func:`prompt_field`."""
    if "text" in record:
        return _text_field(record, "text", where, allow_messages=False)  # type: ignore[return-value]
    if "prompt" in record or "response" in record:
        prompt = _text_field(record, "prompt", where, allow_messages=False)
        return prompt, _text_field(record, "response", where, allow_messages=False)  # type: ignore[return-value]
    if "messages" in record:
        return check_messages(record["messages"], where, "messages")
    raise DataError(f"{where}: expected a string field 'text', 'prompt'+'response' or a 'messages' list")


def load_comparisons(path: str | os.PathLike) -> list[tuple[Text, Text]]:
    """Read a comparison file into ``(chosen, rejected)`` text pairs (formats: see module docstring).

    Raises ``DataError`` (a ``ValueError``: file, 1-based line, field) for a line that is not UTF-8
    or not JSON, a missing, empty or wrongly typed field, a chat role other than system / user /
    assistant, a record of a different shape than the first, an odd number of NeMo lines (the last
    chosen line has no rejected partner) and an empty file. Pairs whose chosen equals rejected are
    dropped, counted and reported (:func:`drop_identical_pairs`).
    """
    pairs: list[tuple[Text, Text]] = []
    first_lines: list[int] = []  # the 1-based line each pair starts on
    shape: str | None = None
    pending: tuple[int, str] | None = None  # NeMo chosen line waiting for its rejected partner
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        this = comparison_format(record, where)
        if shape is None:
            shape = this
        elif this != shape:
            expected = "'text'" if shape == NEMO else "'chosen'/'rejected'"
            raise DataError(
                f"{where}: record shape differs from the first record's (expected field {expected})"
            )
        if shape == PAIR:
            pairs.append(pair_from_record(record, where))
            first_lines.append(lineno)
        elif pending is None:
            pending = (lineno, nemo_text(record, where))
        else:
            pairs.append((pending[1], nemo_text(record, where)))
            first_lines.append(pending[0])
            pending = None
    if shape is None:
        raise DataError(f"{path}: empty file (no records)")
    if pending is not None:
        raise DataError(
            f"{path}:{pending[0]}: odd number of 'text' lines: this chosen line has no rejected partner line"
        )
    return drop_identical_pairs(pairs, path, first_lines)


def drop_identical_pairs(
    pairs: list[tuple[Text, Text]], source: str | os.PathLike, lines: list[int] | None = None
) -> list[tuple[Text, Text]]:
    """``pairs`` without those whose chosen equals rejected (no preference to learn), counted and
    reported as a warning naming the first lines; an error when no pair is left."""
    same = [i for i, (c, r) in enumerate(pairs) if c == r]
    if not same:
        return pairs
    at = [lines[i] for i in same[:5]] if lines else []
    where = f" (line {', '.join(map(str, at))}{', ...' if len(same) > len(at) else ''})" if at else ""
    if len(same) == len(pairs):
        raise DataError(f"{source}: every pair has chosen identical to rejected{where}")
    logger.warning(
        "%s: dropped %d of %d pairs whose chosen is identical to rejected%s",
        source, len(same), len(pairs), where,
    )  # fmt: skip
    drop = set(same)
    return [pr for i, pr in enumerate(pairs) if i not in drop]


def load_prompts(path: str | os.PathLike) -> list[Text]:
    """Read a prompt file (``{"text"}``, ``{"prompt"}`` or ``{"messages"}`` per line) into texts.

    Raises ``DataError`` (a ``ValueError``: file, 1-based line, field) on bad lines, on a record whose
    field differs from the first record's (mixed formats) and for an empty file.
    """
    prompts: list[Text] = []
    shape: str | None = None
    for lineno, record in iter_jsonl(path):
        where = f"{path}:{lineno}"
        prompts.append(prompt_from_record(record, where))
        this = prompt_field(record)
        if shape is None:
            shape = this
        elif this != shape:
            raise DataError(
                f"{where}: field {this!r} differs from the first record's field {shape!r} (mixed formats)"
            )
    if not prompts:
        raise DataError(f"{path}: empty file (no records)")
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
