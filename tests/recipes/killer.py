"""Run a recipe and SIGKILL it at a chosen file-system operation (the kill -9 test's harness).

    python tests/recipes/killer.py <recipe.py> [recipe args...]

Environment: ``KILL_LOG`` (a file: every hooked operation is appended as ``category<TAB>op<TAB>path``)
and ``KILL_AT`` (``category:n``: the n-th operation of that category (:data:`CATEGORIES`) kills the
process, after tearing it: half a file written for ``save``, one file deleted for ``rmtree``,
nothing for ``replace``). The hooked operations are ``os.replace`` (every atomic commit),
``shutil.rmtree`` (pruning, cleanup) and ``torch.save`` / safetensors ``save_file`` (checkpoint and
model files), so the kills land in setup (embedded model and data), in saves and in pruning.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import signal
import sys

import safetensors.torch
import torch

#: Where an operation belongs, by its path: the embedded default's model and data and the stored
#: configuration (setup), checkpoint writes (save), old checkpoints being deleted (prune), final models.
CATEGORIES = {
    "setup": re.compile(r"tiny_|/data/|run_config"),
    "prune": re.compile(r"\.trash-step_"),
    "save": re.compile(r"/checkpoints/"),
    "final": re.compile(r"final|eval_results"),
}
_log = os.environ.get("KILL_LOG")
_kind, _nth = (os.environ.get("KILL_AT", "") + ":0").split(":")[:2]
_seen = {"n": 0}


def category(path: str) -> str:
    return next((name for name, rx in CATEGORIES.items() if rx.search(path)), "other")


def _hook(op: str, path, tear=None) -> None:
    path = str(path)
    kind = category(path)
    if _log:
        with open(_log, "a") as f:
            f.write(f"{kind}\t{op}\t{path}\n")
    if kind == _kind:
        _seen["n"] += 1
        if _seen["n"] == int(_nth):
            if tear is not None:
                tear()
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(op, fn, path_arg, tear=None):
    def wrapped(*args, **kwargs):
        path = args[path_arg] if len(args) > path_arg else next(iter(kwargs.values()), "")
        _hook(op, path, (lambda: tear(*args)) if tear else None)
        return fn(*args, **kwargs)

    return wrapped


def _half_file(obj, path, *_):
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04" + b"\0" * 64)  # the start of a zip that never ends


def _one_file_deleted(path, *_):
    for root, _dirs, files in os.walk(path):
        for name in files:
            os.unlink(os.path.join(root, name))
            return


os.replace = _wrap("replace", os.replace, 0)
shutil.rmtree = _wrap("rmtree", shutil.rmtree, 0, _one_file_deleted)
torch.save = _wrap("save", torch.save, 1, _half_file)
safetensors.torch.save_file = _wrap(
    "save", safetensors.torch.save_file, 1, lambda sd, p, *a: _half_file(sd, p)
)

if __name__ == "__main__":
    recipe = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(recipe)))
    runpy.run_path(recipe, run_name="__main__")
