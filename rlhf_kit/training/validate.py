"""Start-up checks that recipes run before loading anything, so bad configs fail in one line."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_path_exists(path: str | Path, what: str) -> Path:
    """Return ``Path(path)`` or raise ``ValueError("<what> not found: <path>")``."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} not found: {p}")
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
            raise ValueError(f"model directory {p} has no config.json (not a Hugging Face model directory)")
        return str(p)
    if p.exists():
        raise ValueError(f"model path {p} is a file; expected a Hugging Face model directory or hub id")
    if not s.startswith((".", "/", "~")) and looks_like_hub_id(s):
        return s
    raise ValueError(f"model path does not exist: {s} (expected a local directory or a hub id 'org/name')")
