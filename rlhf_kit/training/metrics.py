"""Metric logging (metrics.jsonl and accelerate's trackers: wandb, tensorboard, trackio, mlflow, ...), phase
timers and a rank-0 progress bar."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlhf_kit.training import dist as D


def _scalar(v: Any) -> Any:
    """Python number for tensors/numpy scalars; other values unchanged."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def _json_safe(v: Any) -> Any:
    v = _scalar(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible rather than dropping the key
    return v


#: Always-on local sink; "none" adds nothing.
LOCAL = ("jsonl", "none")
#: Install hints of the trackers whose extra rlhf_kit defines; the others: ``pip install <name>``.
INSTALL_HINTS = {"wandb": "pip install 'rlhf-kit[wandb]'", "tensorboard": "pip install 'rlhf-kit[tensorboard]'",
                 "comet_ml": "pip install comet-ml"}  # fmt: skip


def tracker_names() -> list[str]:
    """The tracker names accelerate knows (``accelerate.tracking.LOGGER_TYPE_TO_CLASS``, trackers
    registered with ``register_tracker_class`` included)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_report_to(report_to: str | Sequence[str]) -> list[str]:
    """The accelerate trackers named in ``report_to`` (``jsonl`` and ``none`` dropped), in order.

    An unknown name, or a built-in tracker whose package is not installed, raises a one-line
    :class:`~rlhf_kit.errors.ConfigError` with the choices or the install hint; recipes call this
    before building any model.
    """
    from accelerate.utils import LoggerType

    from rlhf_kit.errors import ConfigError

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    known = tracker_names()
    trackers: list[str] = []
    for name in names:
        if name in LOCAL or name in trackers:
            continue
        if name not in known:
            raise ConfigError(
                f"--report-to {name}: unknown tracker; choose from {', '.join(['jsonl', *known])} "
                "(accelerate's trackers; metrics.jsonl is always written)"
            )
        if name in {t.value for t in LoggerType}:  # a built-in tracker: its package must import
            try:
                importlib.import_module(name)
            except ImportError:
                hint = INSTALL_HINTS.get(name, f"pip install {name}")
                raise ConfigError(
                    f"--report-to {name}: the {name} package is not installed ({hint})"
                ) from None
        trackers.append(name)
    return trackers


def _config_values(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """A run config as the flat scalar values every tracker's ``store_init_configuration`` accepts
    (tensorboard's hparams take bool/int/float/str only): other values become their ``str``."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def _markdown_table(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    md = ["| " + " | ".join(map(esc, columns)) + " |", "|" + "---|" * len(columns)]
    return "\n".join(md + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


class MetricsLogger:
    """Log dicts of scalars per step to ``<output_dir>/metrics.jsonl`` and to accelerate's trackers.

    ``report_to`` is a name or a sequence of them: ``"jsonl"`` (always on) and any tracker accelerate
    knows (:func:`tracker_names`: wandb, tensorboard, trackio, mlflow, comet_ml, aim, clearml, dvclive,
    swanlab), checked by :func:`check_report_to`. Each tracker is an ``accelerate.tracking`` tracker
    class built the way ``Accelerator.init_trackers`` builds it: those that need a directory write under
    ``<output_dir>/<name>/`` (tensorboard: ``<output_dir>/tensorboard/``), the others get ``project``
    and ``run_name`` (wandb also ``dir=output_dir`` and honours ``WANDB_MODE=offline``); ``config`` is
    stored with ``store_init_configuration``. Only rank 0 writes; other ranks get a logger whose methods
    do nothing.
    """

    def __init__(
        self,
        output_dir: str | Path,
        report_to: str | Sequence[str] = ("jsonl",),
        project: str = "rlhf-kit",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        names = check_report_to(report_to)
        self.backends = {"jsonl", *names}
        self.output_dir = Path(output_dir)
        self.enabled = D.is_main_process()
        self._file = None
        self.trackers: list = []
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        for name in names:
            self.trackers.append(self._start(name, project, run_name, config or {}))

    def _start(self, name: str, project: str, run_name: str | None, config: dict[str, Any]):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[name]
        if cls.requires_logging_directory:  # tensorboard, aim: <output_dir>/<name>/
            tracker = cls(name, str(self.output_dir))
        else:
            kwargs = {"wandb": {"name": run_name, "dir": str(self.output_dir)}, "trackio": {"name": run_name},
                      "mlflow": {"run_name": run_name}}.get(name, {})  # fmt: skip
            tracker = cls(project, **kwargs)
        tracker.start()
        if config:
            tracker.store_init_configuration(_config_values(config))
        return tracker

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append ``{"step": step, **metrics}`` as one JSON line and send the scalars to the trackers."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        scalars = {
            k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in self.trackers:
            tracker.log(scalars, step=int(step))

    def log_table(
        self, name: str, rows: Sequence[Sequence[Any]], columns: Sequence[str], step: int = 0
    ) -> None:
        """Log a table (e.g. sample generations): a jsonl line; a table for trackers with ``log_table``
        (wandb, clearml), a markdown text for tensorboard."""
        if not self.enabled:
            return
        rows = [[_json_safe(c) for c in r] for r in rows]
        for r in rows:
            if len(r) != len(columns):
                raise ValueError(
                    f"log_table {name!r}: row has {len(r)} cells but there are {len(columns)} columns"
                )
        self._file.write(
            json.dumps({"step": int(step), "table": name, "columns": list(columns), "rows": rows}) + "\n"
        )
        self._file.flush()
        for tracker in self.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table(name, columns=list(columns), data=rows, step=int(step))
            elif tracker.name == "tensorboard":
                tracker.log({name: _markdown_table(rows, columns)}, step=int(step))  # add_text

    def close(self) -> None:
        """Flush and close the file and every tracker (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        while self.trackers:
            self.trackers.pop(0).finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All JSON objects of a ``metrics.jsonl`` file (a directory means its ``metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def seconds_since_launch() -> float:
    """Wall-clock seconds since this process started (its creation time, so interpreter start-up and
    imports count): a run's first step logs how long it waited for it (loading, compilation)."""
    import psutil

    return time.time() - psutil.Process().create_time()


class StepTimer:
    """Wall-clock seconds per named phase, accumulated until :meth:`reset`.

    >>> timer = StepTimer()
    >>> with timer("generate"): ...
    >>> timer.summary()  # {"time/generate": 0.12}
    """

    def __init__(self, sync_cuda: bool = True) -> None:
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def summary(self, prefix: str = "time/") -> dict[str, float]:
        """``{prefix + phase: seconds}`` for every timed phase."""
        return {f"{prefix}{k}": v for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw):
    """A tqdm progress bar shown on rank 0 only (disabled elsewhere), written to stderr."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not D.is_main_process(),
        file=sys.stderr,
        dynamic_ncols=True,
        **kw,
    )


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Drop rows with ``step > last_step`` from a ``metrics.jsonl`` (atomically); returns rows kept.

    A run resumed from the checkpoint of ``last_step`` re-logs the steps after it; truncating first
    keeps exactly one row per logged step.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


def truncate_metrics_rows(path: str | Path, rows: int) -> int:
    """Keep only the first ``rows`` rows of a ``metrics.jsonl`` (atomically); returns rows kept.

    A checkpoint records how many rows the file had when it was saved; cutting back to that count
    also drops rows logged at the checkpoint's own step after it (final validation and test rows).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    kept = lines[:rows]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(kept)


class Averager:
    """Weighted means of named values over micro-batches and ranks (e.g. per-step training metrics).

    A tensor value stays on its device, summed there in float64: reading each micro-batch's loss would
    make the host wait for that micro-batch's backward before it queues the next one. :meth:`reduce`
    reads every sum at once."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float | torch.Tensor, weight: float = 1.0) -> None:
        if isinstance(value, torch.Tensor):
            self.sums[name] = self.sums[name] + value.detach().reshape(()).to(torch.float64) * weight
        else:
            self.sums[name] += float(value) * weight
        self.weights[name] += weight

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """Means over everything added on every rank (collective under a process group); resets. One read
        of the device for all the tensor sums."""
        names = sorted(self.sums)
        sums = scalars_to_floats({n: self.sums[n] for n in names})
        flat = D.all_reduce_sum([sums[n] for n in names] + [self.weights[n] for n in names], device)
        k = len(names)
        out = {n: flat[i] / flat[k + i] if flat[k + i] else float("nan") for i, n in enumerate(names)}
        self.sums.clear()
        self.weights.clear()
        return out


def device_memory_stats(prefix: str = "memory/") -> dict[str, float]:
    """Peak GPU memory of this process so far (GiB): allocated by tensors and reserved by the caching
    allocator. Empty on CPU."""
    from rlhf_kit.training.memory_budget import peak_memory  # the peaks before a MemoryBudget's reset too

    if not torch.cuda.is_available():
        return {}
    allocated, reserved = peak_memory()
    return {f"{prefix}peak_allocated_gib": allocated / 2**30, f"{prefix}peak_reserved_gib": reserved / 2**30}


def compile_stats(prefix: str = "compile/") -> dict[str, float]:
    """What ``torch.compile`` has done in this process so far: frames Dynamo compiled (``frames``: a
    recompilation for a new shape or a failed guard counts again), distinct graphs (``graphs``), seconds
    spent compiling (``seconds``) and code objects that hit Dynamo's recompile limit (``limit_hits``: from
    then on, each call that misses its compiled entries runs eagerly). Empty before anything compiled.
    A logged step whose counts rose paid compilation, so its times are not the steady state."""
    try:  # Dynamo's own records (private, but present through torch 2.x); absent: nothing to report
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:  # pragma: no cover - torch builds without Dynamo
        return {}
    times = compilation_time_metrics.get("_compile.compile_inner", ())  # one entry per frame compiled
    if not times:  # (Dynamo's "frames" counter skips fullgraph compilations)
        return {}
    return {
        f"{prefix}frames": float(len(times)),
        f"{prefix}graphs": float(counters["stats"].get("unique_graphs", 0)),
        f"{prefix}seconds": float(sum(times)),
        f"{prefix}limit_hits": float(
            sum(n for why, n in counters["unimplemented"].items() if _limit_hit(why))
        ),
    }


def _limit_hit(reason: str) -> bool:
    """Is ``reason`` (a key of Dynamo's ``unimplemented`` counter) a recompile limit reached? Both wordings
    match: "Dynamo recompile limit exceeded ..." (torch 2.13) and older releases' "<limit name> reached".
    A release that stops at the limit without counting it reads 0."""
    reason = reason.lower()
    return "recompile limit" in reason or "recompile_limit" in reason or "cache_size_limit" in reason


def scalars_to_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Python floats of scalar statistics, with one device-to-host copy for all the tensors among them
    (each ``.item()`` would wait for the device on its own)."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if keys:
        device = values[keys[0]].device
        host = torch.stack([values[k].detach().reshape(()).to(device, torch.float64) for k in keys]).tolist()
        out |= dict(zip(keys, host))
    return {k: out[k] for k in values}  # the caller's order
