"""Atomic, resumable training checkpoints (models, optimizers, schedulers, RNG, free-form state).

Layout of one checkpoint::

    <dir>/step_<N>/
        meta.json                         step, model/optimizer/scheduler names, world size
        models/<name>/model.safetensors   full (gathered) weights, written by rank 0
        optimizers/<name>.pt              full optimizer state (torch.save)
        schedulers/<name>.pt              scheduler state
        extra.pt                          caller state: json-able values and tensors (data position, ...)
        rng/rank_<r>.pt                   python/numpy/torch(/cuda) RNG states of every rank
    <dir>/latest                          name of the newest complete checkpoint, replaced atomically

A checkpoint is assembled in ``<dir>/.step_<N>.tmp`` and moved into place with ``os.replace``, and
``latest`` is updated last, so a crash never leaves a half-written checkpoint behind; a failed write
(a full disk: one-line :class:`~rlhf_kit.errors.DiskFullError`) removes the temporary directory.
Old checkpoints are renamed to a trash name before they are deleted. A model with a NaN/inf tensor is
never written (:class:`~rlhf_kit.errors.NonFiniteError`). ``meta.json`` records how many rows the
run's ``metrics.jsonl`` (beside ``<dir>``) had, so a resumed run truncates it to exactly that point.

FSDP2 models (DTensor parameters) are gathered with ``torch.distributed.checkpoint.state_dict``
helpers (full state dict, CPU offload); every rank must call :func:`save_checkpoint` and
:func:`load_checkpoint` then, as they are collective. All files hold tensors and plain values only,
so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_kit.errors import RunError
from rlhf_kit.training import dist as D
from rlhf_kit.training.atomic import (
    disk_full_error,
    is_disk_full,
    remove_directory,
    replace_directory,
    sweep_leftovers,
)
from rlhf_kit.training.fsdp import full_state_dict, is_sharded
from rlhf_kit.training.guard import check_finite_on_all_ranks

_STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"


# ----------------------------------------------------------------------------------------------- utils
def _unwrap(model: nn.Module) -> nn.Module:
    """The inner module of a DDP wrapper (accelerate wraps models in DDP on several processes)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _safetensors_ready(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (tied weights are stored twice), as safetensors needs."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu")
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


# ------------------------------------------------------------------------------------ model / optimizer
def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of a plain or FSDP2 model (collective for FSDP2; only rank 0 gets tensors)."""
    return full_state_dict(_unwrap(model))


def load_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict into a plain or FSDP2 model (every rank passes the full dict)."""
    model = _unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        model.load_state_dict(state, strict=strict)


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module | None) -> dict:
    """Full optimizer state; gathered through ``model`` when it is FSDP2-sharded (collective)."""
    if model is not None and is_sharded(_unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(_unwrap(model), optimizer, options=opts)
    return optimizer.state_dict()


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict, model: nn.Module | None) -> None:
    """Inverse of :func:`optimizer_state_dict`."""
    if model is not None and is_sharded(_unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            _unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- rng
def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch and (if present) CUDA, as tensors and plain values."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": (version, list(py_state), gauss),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ discovery
def _step_dirs(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (via the ``latest`` pointer), or None."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    found = _step_dirs(directory)
    return found[-1][1] if found else None


# -------------------------------------------------------------------------------------------- save
def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
    keep_last: int | None = None,
) -> Path:
    """Write ``<directory>/step_<step>/`` atomically and point ``latest`` at it; returns its path.

    ``optimizers`` are keyed like the model they optimise (needed to gather FSDP2 optimizer state).
    ``extra`` holds json-able values and tensors (KL controller state, data position, ...).
    ``keep_last`` deletes all but the newest ``keep_last`` checkpoints. Call on every rank.
    """
    optimizers, schedulers, extra = optimizers or {}, schedulers or {}, extra or {}
    directory = Path(directory)
    final = directory / f"step_{step}"
    tmp = directory / f".step_{step}.tmp"
    main = D.is_main_process()
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(directory)
        for stale in directory.glob(".step_*.tmp"):  # a killed save of this or another step
            shutil.rmtree(stale, ignore_errors=True)
    try:
        _write_checkpoint(tmp, step, models, optimizers, schedulers, extra, rng)
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if (
            isinstance(e, (OSError, RuntimeError))
            and not isinstance(e, RunError)
            and is_disk_full(e, directory)
        ):
            raise disk_full_error(directory, f"checkpoint step_{step}") from None
        raise
    D.barrier()
    if main:
        replace_directory(tmp, final)  # re-saving a step moves the old one aside first
        _atomic_write_text(directory / LATEST, final.name + "\n")
        if keep_last is not None and keep_last > 0:
            for _, old_dir in _step_dirs(directory)[:-keep_last]:
                if old_dir != final:
                    remove_directory(old_dir)  # renamed first: never a half-deleted step_N
    D.barrier()
    return final


def _metrics_rows(directory: Path) -> int | None:
    """Rows of the run's ``metrics.jsonl`` (beside the checkpoint directory), or None if there is none."""
    path = directory.parent / "metrics.jsonl"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _write_checkpoint(tmp: Path, step: int, models, optimizers, schedulers, extra, rng: bool) -> None:
    main = D.is_main_process()
    if main:
        for sub in ("models", "optimizers", "schedulers", "rng"):
            (tmp / sub).mkdir(parents=True)
    D.barrier()
    if rng:
        torch.save(rng_state(), tmp / "rng" / f"rank_{D.rank()}.pt")
    for name, model in models.items():  # collective for FSDP2: every rank gathers
        sd = model_state_dict(model)
        check_finite_on_all_ranks(sd, f"checkpoint step_{step} (model {name!r})")
        if main:
            (tmp / "models" / name).mkdir()
            save_file(_safetensors_ready(sd), str(tmp / "models" / name / "model.safetensors"))
        del sd
    for name, opt in optimizers.items():
        osd = optimizer_state_dict(opt, models.get(name))
        if main:
            torch.save(osd, tmp / "optimizers" / f"{name}.pt")
        del osd
    if main:
        for name, sched in schedulers.items():
            torch.save(sched.state_dict(), tmp / "schedulers" / f"{name}.pt")
        torch.save(extra, tmp / "extra.pt")
        meta = {
            "step": step,
            "models": sorted(models),
            "optimizers": sorted(optimizers),
            "schedulers": sorted(schedulers),
            "world_size": D.world_size(),
            "time": time.time(),
            "metrics_rows": _metrics_rows(tmp.parent),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a ``step_<N>`` checkpoint directory."""
    return json.loads((Path(path) / "meta.json").read_text())


# -------------------------------------------------------------------------------------------- load
def load_checkpoint(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    schedulers: dict[str, Any] | None = None,
    rng: bool = True,
    strict: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint into existing objects; returns ``(step, extra)``.

    ``path`` is a ``step_<N>`` directory or a checkpoint root (then its latest checkpoint is used).
    RNG states are restored per rank when ``rng`` (and the checkpoint has this rank's state).
    """
    path = Path(path)
    if not (path / "meta.json").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"no checkpoint found in {path}")
        path = found
    meta = json.loads((path / "meta.json").read_text())
    for kind, given in (
        ("models", models),
        ("optimizers", optimizers or {}),
        ("schedulers", schedulers or {}),
    ):
        missing = sorted(set(given) - set(meta[kind]))
        if missing:
            raise ValueError(f"checkpoint {path} has no {kind} named {missing} (it has {meta[kind]})")
    for name, model in models.items():
        load_model_state_dict(
            model, load_file(str(path / "models" / name / "model.safetensors")), strict=strict
        )
    for name, opt in (optimizers or {}).items():
        state = torch.load(path / "optimizers" / f"{name}.pt", map_location="cpu", weights_only=True)
        load_optimizer_state_dict(opt, state, models.get(name))
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(torch.load(path / "schedulers" / f"{name}.pt", weights_only=True))
    extra = torch.load(path / "extra.pt", map_location="cpu", weights_only=True)
    rng_file = path / "rng" / f"rank_{D.rank()}.pt"
    if rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    D.barrier()
    return int(meta["step"]), extra
