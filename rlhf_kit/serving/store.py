"""Where the critic server may write: checkpoint directories it names itself, inside its output directory.

A request names ``final`` or ``checkpoints/<name>`` (``name``: letters, digits, ``_ . -``, not starting
with a dot); every path is resolved to its real path and must stay inside the real output directory,
symlinks are refused, and a directory is only ever replaced or pruned when the server wrote it (it
holds :data:`MARKER`). Temporary directories are the server's own ``.<name>.tmp`` / ``.<name>.old``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

#: Marks a directory written by :meth:`CheckpointStore.save`.
MARKER = "critic_server.json"
#: The subdirectory that holds rotated checkpoints (``keep_last`` prunes only there).
CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CheckpointStore:
    """The directories under ``output_dir`` that :class:`~rlhf_kit.serving.CriticRewardService` saves to.

    Args:
        output_dir: resolved to its real path once, here (an operator's symlink is followed).
    """

    def __init__(self, output_dir: str | Path):
        self.root = Path(os.path.realpath(output_dir))

    def resolve(self, path: str | Path) -> Path:
        """The real directory of a request path ``final`` or ``checkpoints/<name>``; one-line
        ``ValueError`` otherwise, or when a symlink or a non-directory sits on the way."""
        text = str(path)
        parts = text.split("/")
        ok = (parts == ["final"]) or (
            len(parts) == 2 and parts[0] == CHECKPOINTS and _NAME.fullmatch(parts[1])
        )
        if not ok:
            raise ValueError(
                f"path {text!r}: a critic server saves only to 'final' or '{CHECKPOINTS}/<name>' "
                "(letters, digits, _ . -) inside the server's --output-dir"
            )
        target = self.root.joinpath(*parts)
        for p in [self.root / parts[0]] + ([target] if len(parts) == 2 else []):
            if p.is_symlink():
                raise ValueError(f"path {text!r}: {p} is a symlink; the server does not follow them")
        real = Path(os.path.realpath(target))
        if real != target or self.root not in real.parents:
            raise ValueError(f"path {text!r} resolves to {real}, outside the server's --output-dir")
        return target

    def save(self, path: str | Path, write: Callable[[Path], None], keep_last: int | None = None) -> Path:
        """Call ``write(tmp)`` on a fresh temporary directory (it writes the checkpoint and
        :data:`MARKER` with ``train_calls``), then move it to ``path`` atomically. An existing
        ``path`` is replaced only when the server wrote it. With ``keep_last`` (``checkpoints/`` paths
        only), older server-written siblings beyond the newest ``keep_last`` are deleted."""
        target = self.resolve(path)
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise ValueError(f"keep_last must be a positive integer or null, got {keep_last!r}")
        if keep_last is not None and target.parent == self.root:
            raise ValueError(f"keep_last applies to '{CHECKPOINTS}/<name>' saves, not to {str(path)!r}")
        if target.exists() and not (target / MARKER).is_file():
            raise ValueError(f"path {str(path)!r}: {target} exists and was not written by a critic server")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = (target.with_name(f".{target.name}.{s}") for s in ("tmp", "old"))
        _remove(tmp)
        tmp.mkdir()
        write(tmp)
        if target.exists():
            _remove(old)
            target.replace(old)
            tmp.replace(target)
            _remove(old)
        else:
            tmp.replace(target)
        if keep_last is not None:
            self._prune(target, keep_last)
        return target

    def load_dir(self, path: str | Path) -> Path:
        """The real directory of a saved checkpoint (it must hold :data:`MARKER`)."""
        target = self.resolve(path)
        if not (target / MARKER).is_file():
            raise ValueError(f"no critic server checkpoint at {target} (no {MARKER})")
        return target

    @staticmethod
    def _prune(target: Path, keep_last: int) -> list[Path]:
        saved = []
        for p in target.parent.iterdir():
            if p == target or p.is_symlink() or not _NAME.fullmatch(p.name) or not (p / MARKER).is_file():
                continue
            try:
                saved.append((int(json.loads((p / MARKER).read_text())["train_calls"]), p.name, p))
            except (ValueError, KeyError, TypeError, OSError):
                continue  # not a marker this server wrote: left alone
        saved.sort()
        doomed = [p for *_, p in saved[: max(0, len(saved) + 1 - keep_last)]]
        for p in doomed:
            _remove(p)
        return doomed


def _remove(path: Path) -> None:
    """Delete a server-named temporary or checkpoint entry: a symlink is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
