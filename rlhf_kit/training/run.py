"""Recipe start-up: one-line configuration errors, output directories and resume bookkeeping."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf_kit.training import dist as D
from rlhf_kit.training.checkpoint import latest_checkpoint
from rlhf_kit.training.metrics import truncate_metrics

CHECKPOINTS = "checkpoints"
#: Seconds a non-main process waits before exiting on a one-line error, so that the launcher does not
#: stop the main process before its line is out.
ERROR_GRACE_S = 2.0


@contextmanager
def one_line_errors(program: str) -> Iterator[None]:
    """Turn a ``ValueError``/``FileNotFoundError``/``ConnectionError`` raised inside into
    ``<program>: error: <reason>`` on stderr and exit status 2, so a bad configuration (or an
    unreachable server) stops with one line instead of a traceback. Only the main process prints it
    (``RANK`` 0 or unset), so a job of N processes shows the line once; every process exits 2, the
    others after :data:`ERROR_GRACE_S` seconds."""
    try:
        yield
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        text = str(e).strip() or type(e).__name__
        if D.env_rank() == 0:
            print(f"{program}: error: {text.splitlines()[0]}", file=sys.stderr, flush=True)
        else:
            time.sleep(ERROR_GRACE_S)
        raise SystemExit(2) from None


def check_positive(**values: float | int | None) -> None:
    """Raise ``ValueError("--name must be > 0, got v")`` for the first non-positive value given."""
    for name, v in values.items():
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")


def resume_point(output_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, checking the output directory is consistent with ``resume``.

    Without ``resume`` an output directory that already holds checkpoints is refused (one line), so
    a run never silently mixes with an older one; a stale ``metrics.jsonl`` is removed. With
    ``resume`` and no checkpoint yet, training starts from scratch.
    """
    ck_dir = Path(output_dir) / CHECKPOINTS
    found = latest_checkpoint(ck_dir)
    if not resume:
        if found is not None:
            raise ValueError(
                f"{output_dir} already has checkpoints ({found.name}); pass --resume to continue that run "
                "or choose another --output-dir"
            )
        if D.is_main_process():
            metrics = Path(output_dir) / "metrics.jsonl"
            metrics.unlink(missing_ok=True)
            shutil.rmtree(ck_dir, ignore_errors=True)
    return found


def prepare_metrics_for_resume(output_dir: str | Path, step: int) -> None:
    """Drop metrics rows logged after ``step`` (they will be logged again by the resumed run)."""
    if D.is_main_process():
        truncate_metrics(Path(output_dir) / "metrics.jsonl", step)


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as indented JSON atomically (temp file + ``os.replace``)."""
    import json
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
