"""The closing summary every recipe prints: what it wrote, then its final numbers, in one format.

ppo: done
  final model       out/ppo/final
  metrics           out/ppo/metrics.jsonl
  val/kl/seq_mean   0.0123
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf_kit.training import dist as D


def flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with ``/``-joined keys (``{"test": {"accuracy": 1}}`` -> ``test/accuracy``)."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def run_outputs(output_dir: str | Path, **extra: str) -> dict[str, Path]:
    """What a training recipe leaves in ``output_dir``: ``final/`` (the model), any ``extra`` files or
    folders (keyword -> name under ``output_dir``, the keyword's ``_`` shown as a space), ``metrics.jsonl``."""
    d = Path(output_dir)
    named = {key.replace("_", " "): d / name for key, name in extra.items()}
    return {"final model": d / "final", **named, "metrics": d / "metrics.jsonl"}


def format_summary(
    stage: str, outputs: Mapping[str, str | Path], results: Mapping[str, Any] | None = None
) -> str:
    """``<stage>: done``, then one aligned ``name  value`` row per output path and per result (nested
    results flattened with :func:`flatten`; floats with 4 decimals)."""
    rows = [(name, str(path)) for name, path in outputs.items()]
    for name, value in flatten(results or {}).items():
        rows.append((name, f"{value:.4f}" if isinstance(value, float) else str(value)))
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join([f"{stage}: done", *(f"  {name:<{width}}  {value}" for name, value in rows)])


def print_summary(
    stage: str, outputs: Mapping[str, str | Path], results: Mapping[str, Any] | None = None
) -> None:
    """Print :func:`format_summary` on the main process only."""
    if D.is_main_process():
        print(format_summary(stage, outputs, results), flush=True)
