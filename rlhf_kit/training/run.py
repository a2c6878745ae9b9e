"""Recipe start-up: one-line errors, number checks, output directories and resume bookkeeping.

:func:`start_run` is the one call a recipe makes to claim its output directory: it checks the
directory is writable, refuses a used one unless ``--resume`` or ``--overwrite`` is given, stores the
run's configuration (``run_config.json``) and, on resume, refuses any change of a setting that alters
the training trajectory; it returns the checkpoint to resume from, with ``metrics.jsonl`` already cut
back to what that checkpoint had seen.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_kit.errors import ConfigError, RunError
from rlhf_kit.training import dist as D
from rlhf_kit.training.atomic import remove_directory, sweep_leftovers, write_file
from rlhf_kit.training.checkpoint import checkpoint_meta, latest_checkpoint
from rlhf_kit.training.metrics import truncate_metrics, truncate_metrics_rows

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
#: Fields that never change a run's trajectory; every recipe may change them on ``--resume``.
ALWAYS_MAY_CHANGE = (
    "output_dir",
    "resume",
    "overwrite",
    "extend_max_steps",
    "max_bad_steps",
    "report_to",
    "project",
    "run_name",
    "save_interval",
    "keep_last",
    "stop_at_step",
)
#: Fields that ``extend_max_steps`` lets grow on resume.
EXTENDABLE = ("max_steps", "epochs")
#: Seconds a non-main process waits before exiting on a one-line error, so that the launcher does not
#: stop the main process before its line is out.
ERROR_GRACE_S = 2.0


@contextmanager
def one_line_errors(program: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Turn an error of ``kinds`` raised inside into ``<program>: error: <reason>`` on stderr and exit.

    ``kinds`` defaults to ``ValueError``, ``FileNotFoundError``, ``ConnectionError`` (an unreachable
    server) and :class:`~rlhf_kit.errors.RunError` (bad input, a full disk, a run that keeps producing NaN); wrap a whole training run with
    ``one_line_errors(prog, RunError)`` so only the errors meant for the user lose their traceback.
    Any ``OSError`` of a full disk (``ENOSPC``) is one line too. Exit status 2 for bad input, 1 for a
    run stopped on the way (disk full, non-finite values). Only the main process prints the line
    (``RANK`` 0 or unset), so a job of N processes shows it once; the others exit after
    :data:`ERROR_GRACE_S` seconds.
    """
    kinds = kinds or (ValueError, FileNotFoundError, ConnectionError, RunError)
    try:
        yield
    except BaseException as e:
        if isinstance(e, kinds):
            text = str(e).strip() or type(e).__name__
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            text = f"disk full{f' writing {e.filename}' if e.filename else ''} ({e.strerror})"
        else:
            raise
        bad_input = isinstance(e, (ValueError, FileNotFoundError, ConnectionError)) or not isinstance(
            e, (RunError, OSError)
        )
        _close_progress_bars()  # so the message is the last line, not a bar redrawn at exit
        if D.env_rank() == 0:
            print(f"{program}: error: {text.splitlines()[0]}", file=sys.stderr, flush=True)
        else:
            time.sleep(ERROR_GRACE_S)
        raise SystemExit(2 if bad_input else 1) from None


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{_flag(name)} must be a finite number, got {v}")
    return v


def check_positive(**values: float | int | None) -> None:
    """Raise ``ConfigError("--name must be > 0, got v")`` for the first non-positive or non-finite value."""
    for name, v in values.items():
        if v is not None and _number(name, v) <= 0:
            raise ConfigError(f"{_flag(name)} must be > 0, got {v}")


def check_non_negative(**values: float | int | None) -> None:
    """Raise ``ConfigError`` for the first negative or non-finite value given (None is skipped)."""
    for name, v in values.items():
        if v is not None and _number(name, v) < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {v}")


def check_finite_fields(cfg: Any) -> None:
    """Every float field of the dataclass ``cfg`` (learning rates, coefficients, ...) must be finite:
    ``--lr nan`` or ``--kl-coef inf`` stop with one line before anything is loaded."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float):
            _number(f.name, v)


def check_numbers(
    cfg: Any,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    unit_interval: Iterable[str] = (),
) -> None:
    """Number checks of a config dataclass in one call: every float field finite
    (:func:`check_finite_fields`), the fields named in ``positive`` > 0, ``non_negative`` >= 0 and
    ``unit_interval`` in [0, 1] (None values are skipped). One-line ``ConfigError`` for the first bad one."""
    check_finite_fields(cfg)
    check_positive(**{n: getattr(cfg, n) for n in positive})
    check_non_negative(**{n: getattr(cfg, n) for n in non_negative})
    for n in unit_interval:
        v = getattr(cfg, n)
        if v is not None and not 0 <= _number(n, v) <= 1:
            raise ConfigError(f"{_flag(n)} must be in [0, 1], got {v}")


def check_writable(path: str | Path) -> Path:
    """Create ``path`` if needed and write (then delete) a small file in it.

    Raises a one-line :class:`~rlhf_kit.errors.ConfigError` naming the directory when it cannot be
    created or written (read-only file system, no permission, full disk), before any work is done.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=p, prefix=".write-check-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise ConfigError(f"output directory {p} is not writable: {why}") from None
    return p


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _defaults(cfg: Any) -> dict[str, Any]:
    """The default of every field of the dataclass ``cfg`` that has one, as it reads back from JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default_factory())
    return out


def used_output_dir(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run (checkpoints, metrics, stored configuration)."""
    out = Path(output_dir)
    used = []
    if latest_checkpoint(out / CHECKPOINTS) is not None:
        used.append(f"{CHECKPOINTS}/{latest_checkpoint(out / CHECKPOINTS).name}")
    used += [name for name in (METRICS, RUN_CONFIG) if (out / name).is_file()]
    return used


def config_changes(
    stored: dict[str, Any],
    current: dict[str, Any],
    may_change: Iterable[str],
    extend_max_steps: bool,
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """``"--field: old -> new"`` for every field that differs and may not change on resume.

    A field the stored configuration lacks (written by an earlier release, before the field existed)
    counts as unchanged while it holds its default in ``defaults``: new fields come with defaults that
    keep what the earlier release did."""
    allowed = set(ALWAYS_MAY_CHANGE) | set(may_change)
    defaults = defaults or {}
    changes = []
    for k in sorted(set(stored) | set(current)):
        old, new = stored.get(k), current.get(k)
        if k in allowed or old == new:
            continue
        if k not in stored and k in defaults and new == defaults[k]:
            continue
        if (
            extend_max_steps
            and k in EXTENDABLE
            and isinstance(old, (int, float))
            and isinstance(new, (int, float))
        ):
            if new > old:
                continue
        changes.append(f"{_flag(k)}: {old!r} -> {new!r}")
    return changes


def start_run(
    cfg: Any,
    output_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool = False,
    may_change: Iterable[str] = (),
    extend_max_steps: bool = False,
) -> Path | None:
    """Claim ``output_dir`` for the run configured by the dataclass ``cfg``; returns the checkpoint to
    resume from (None: start from scratch). Call on every rank (collective), before loading anything.

    * The directory must be writable (:func:`check_writable`).
    * Without ``resume``, a directory used by an earlier run (checkpoints, ``metrics.jsonl``,
      ``run_config.json``) is refused unless ``overwrite``, which removes those first.
    * ``<output_dir>/run_config.json`` stores ``cfg``. With ``resume`` the stored configuration is
      compared with ``cfg``: any difference outside :data:`ALWAYS_MAY_CHANGE` and ``may_change`` is
      refused with the fields named (it would change what the run computes). ``extend_max_steps``
      lets ``max_steps`` / ``epochs`` grow; the schedule is then rebuilt for the new length, so the
      run no longer equals one started with that length. The stored configuration is then updated.
    * Temporary and trash directories a killed run left behind are removed.
    * On resume ``metrics.jsonl`` is truncated to the rows written before the checkpoint was saved
      (to nothing when there is no checkpoint), so no step is logged twice.
    """
    out = Path(output_dir)
    check_writable(out)
    current = _jsonable(dataclasses.asdict(cfg))
    used = used_output_dir(out)
    stored_file = out / RUN_CONFIG
    if not resume and used and not overwrite:
        raise ConfigError(
            f"{out} is used by an earlier run ({', '.join(used)}); pass --resume to continue it, "
            "--overwrite to start again there, or choose another --output-dir"
        )
    if resume and stored_file.is_file():
        try:
            stored = json.loads(stored_file.read_text())["config"]
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{stored_file}: unreadable stored configuration ({e})") from None
        changes = config_changes(stored, current, may_change, extend_max_steps, _defaults(cfg))
        if changes:
            raise ConfigError(
                f"--resume with settings that change the run ({'; '.join(changes)}): restore them, "
                f"or start a new run in another --output-dir (stored in {stored_file})"
            )
    found = latest_checkpoint(out / CHECKPOINTS) if resume else None
    D.barrier()  # every rank has decided before rank 0 changes anything
    if D.is_main_process():
        sweep_leftovers(out, depth=2)  # what a killed run was writing (init/.tmp-actor-<pid>, ...)
        if overwrite and not resume:
            remove_directory(out / CHECKPOINTS)
            for name in (METRICS, RUN_CONFIG):
                (out / name).unlink(missing_ok=True)
        if found is None:
            (out / METRICS).unlink(missing_ok=True)
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        else:
            rows = checkpoint_meta(found).get("metrics_rows")
            if rows is None:
                truncate_metrics(out / METRICS, int(checkpoint_meta(found)["step"]))
            else:
                truncate_metrics_rows(out / METRICS, rows)
        write_json(stored_file, {"config": current})
    D.barrier()
    return found


def resume_point(output_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, checking the output directory is consistent with ``resume``.

    Without ``resume`` an output directory that already holds checkpoints is refused (one line), so
    a run never silently mixes with an older one; a stale ``metrics.jsonl`` is removed. With
    ``resume`` and no checkpoint yet, training starts from scratch. (:func:`start_run` does this and
    more: stored configuration, changed settings, ``--overwrite``.)
    """
    ck_dir = Path(output_dir) / CHECKPOINTS
    found = latest_checkpoint(ck_dir)
    if not resume:
        if found is not None:
            raise ConfigError(
                f"{output_dir} already has checkpoints ({found.name}); pass --resume to continue that run "
                "or choose another --output-dir"
            )
        if D.is_main_process():
            metrics = Path(output_dir) / METRICS
            metrics.unlink(missing_ok=True)
            shutil.rmtree(ck_dir, ignore_errors=True)
    return found


def prepare_metrics_for_resume(output_dir: str | Path, step: int) -> None:
    """Drop metrics rows logged after ``step`` (they will be logged again by the resumed run)."""
    if D.is_main_process():
        truncate_metrics(Path(output_dir) / METRICS, step)


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as indented JSON atomically (:func:`rlhf_kit.training.atomic.write_file`)."""
    write_file(path, json.dumps(data, indent=2, default=str) + "\n")
