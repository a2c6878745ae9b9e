"""Metric logging (metrics.jsonl, wandb, tensorboard), phase timers and a rank-0 progress bar."""

from __future__ import annotations

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

BACKENDS = ("jsonl", "wandb", "tensorboard")


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


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "report_to includes 'wandb' but wandb is not installed: pip install rlhf-kit[wandb]"
        ) from e
    return wandb


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "report_to includes 'tensorboard' but tensorboard is not installed: pip install rlhf-kit[tensorboard]"
        ) from e
    return SummaryWriter


class MetricsLogger:
    """Log dicts of scalars per step to ``<output_dir>/metrics.jsonl`` and optionally wandb / tensorboard.

    ``report_to`` is a backend name or a sequence of them (``"jsonl"`` is always on). Only rank 0
    writes; other ranks get a logger whose methods do nothing. wandb honours ``WANDB_MODE=offline``
    (no network) and writes under ``output_dir``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        report_to: str | Sequence[str] = ("jsonl",),
        project: str = "rlhf-kit",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        backends = {report_to} if isinstance(report_to, str) else set(report_to)
        backends.discard("none")
        unknown = backends - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown report_to backend(s) {sorted(unknown)}; choose from {BACKENDS}")
        self.backends = backends | {"jsonl"}
        self.output_dir = Path(output_dir)
        self.enabled = D.is_main_process()
        self._file = self._wandb = self._tb = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        if "wandb" in self.backends:
            wandb = _import_wandb()
            self._wandb = wandb.init(
                project=project, name=run_name, config=config or {}, dir=str(self.output_dir)
            )
        if "tensorboard" in self.backends:
            self._tb = _import_tensorboard()(log_dir=str(self.output_dir / "tensorboard"))
            if config:
                self._tb.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append ``{"step": step, **metrics}`` as one JSON line and forward scalars to the other backends."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {k: _scalar(v) for k, v in metrics.items()}
        scalars = {
            k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def log_table(
        self, name: str, rows: Sequence[Sequence[Any]], columns: Sequence[str], step: int = 0
    ) -> None:
        """Log a table (e.g. sample generations): a wandb Table, a jsonl line, a tensorboard markdown text."""
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
        if self._wandb is not None:
            wandb = _import_wandb()
            self._wandb.log({name: wandb.Table(columns=list(columns), data=rows)}, step=int(step))
        if self._tb is not None:
            esc = lambda c: str(c).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
            md = ["| " + " | ".join(map(esc, columns)) + " |", "|" + "---|" * len(columns)]
            md += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            self._tb.add_text(name, "\n".join(md), int(step))
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every backend (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

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
    """Weighted means of named values over micro-batches and ranks (e.g. per-step training metrics)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float | torch.Tensor, weight: float = 1.0) -> None:
        self.sums[name] += float(value) * weight
        self.weights[name] += weight

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """Means over everything added on every rank (collective under a process group); resets."""
        names = sorted(self.sums)
        flat = D.all_reduce_sum([self.sums[n] for n in names] + [self.weights[n] for n in names], device)
        k = len(names)
        out = {n: flat[i] / flat[k + i] if flat[k + i] else float("nan") for i, n in enumerate(names)}
        self.sums.clear()
        self.weights.clear()
        return out


def device_memory_stats(prefix: str = "memory/") -> dict[str, float]:
    """Peak GPU memory of this process so far (GiB): allocated by tensors and reserved by the caching
    allocator. Empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    return {
        f"{prefix}peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        f"{prefix}peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
