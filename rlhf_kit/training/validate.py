"""Start-up checks that recipes run before loading anything, so bad configs fail in one line."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from rlhf_kit.errors import ConfigError

_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_path_exists(path: str | Path, what: str) -> Path:
    """Return ``Path(path)`` or raise ``ValueError("<what> not found: <path>")``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} not found: {p}")
    return p


def looks_like_hub_id(name: str) -> bool:
    """True for strings shaped like a hub repository id (``org/name``)."""
    return bool(_HUB_ID.match(name))


def check_model_path(path_or_name: str | Path) -> str:
    """Validate a ``--model`` value: a local HF directory with ``config.json``, or a hub id ``org/name``.

    Returns the value as a string. A local directory without ``config.json``, or a string that is
    neither an existing directory nor a hub id, raises a one-line ``ValueError``.
    """
    s = str(path_or_name)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model directory {p} has no config.json (not a Hugging Face model directory)")
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise ConfigError(f"{p / 'config.json'}: unreadable model config ({e})") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise ConfigError(f"{p / 'config.json'}: no 'model_type' (not a Hugging Face model config)")
        if not any(any(p.glob(w)) for w in _WEIGHTS) and not (p / "adapter_config.json").is_file():
            raise ConfigError(f"model directory {p} has no weights (*.safetensors / *.bin)")
        return str(p)
    if p.exists():
        raise ConfigError(f"model path {p} is a file; expected a Hugging Face model directory or hub id")
    if not s.startswith((".", "/", "~")) and looks_like_hub_id(s):
        return s
    raise ConfigError(f"model path does not exist: {s} (expected a local directory or a hub id 'org/name')")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the vocabulary (token -> id, added tokens included) and the
    special tokens other than the pad token. Two tokenizers with the same fingerprint give the same ids
    for every text. The pad token is left out: it encodes no text, and :func:`~rlhf_kit.data.load_tokenizer`
    sets one (EOS) on a tokenizer that ships none, so an actor loaded that way still matches a reward
    model saved from the same directory."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items() if k != "pad_token")
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def check_same_tokenizer(tokenizer: Any, models: dict[str, str | None], reference: str = "the actor") -> None:
    """Raise :class:`~rlhf_kit.errors.ConfigError` when a model directory in ``models`` (``{flag: path}``)
    ships a tokenizer that differs from ``tokenizer`` (vocabulary or special tokens): its ids would mean
    other tokens, even when the vocabulary sizes match. Directories without tokenizer files and hub ids
    are skipped (nothing to compare)."""
    want = None
    for flag, path in models.items():
        if path is None or not Path(path).is_dir():
            continue
        if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
            continue
        from transformers import AutoTokenizer

        other = AutoTokenizer.from_pretrained(path)
        want = want or tokenizer_fingerprint(tokenizer)
        if tokenizer_fingerprint(other) != want:
            raise ConfigError(
                f"{flag} {path}: its tokenizer differs from {reference}'s ({len(other)} vs {len(tokenizer)} "
                "tokens, or other ids / special tokens): train it with the same tokenizer"
            )
