"""Run several recipe subprocesses at once and collect each one's result.

CI has 2 cores, and a recipe subprocess that stops on a configuration error spends its ~7 s importing
torch and transformers on one core: started together, such commands take about half the wall time they
take one after another. Each command still runs as its own fresh process, and each test still checks
its own result.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Hashable, Mapping
from pathlib import Path


def run_all(
    commands: Mapping[Hashable, list[str]], *, env: dict, cwd, timeout: float = 300
) -> dict[Hashable, subprocess.CompletedProcess]:
    """Start every command of ``commands`` (key -> argv) at once; ``{key: CompletedProcess}`` once all
    have ended (output captured as text). Nothing is checked here: a failing command is its test's to
    report. Any command still running when this raises (a timeout) is killed."""
    procs = {
        key: subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, cmd in commands.items()
    }
    results = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return results


def run_bad_configurations(
    script, cases, root: Path, *, env: dict, cwd, timeout: float = 300
) -> dict[tuple, tuple[subprocess.CompletedProcess, Path]]:
    """Run ``script --output-dir <root>/case<i>/out <args>`` for every ``(args, message)`` of ``cases``
    at once (:func:`run_all`): ``{tuple(args): (CompletedProcess, output dir)}``, for the recipes'
    one-line configuration-error tests (each command is ~7 s of imports on one core)."""
    outs = {tuple(args): Path(root) / f"case{i}" / "out" for i, (args, _) in enumerate(cases)}
    procs = run_all(
        {key: [sys.executable, str(script), "--output-dir", str(out), *key] for key, out in outs.items()},
        env=env, cwd=cwd, timeout=timeout,
    )  # fmt: skip
    return {key: (procs[key], outs[key]) for key in outs}


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc`` if it exited 0, else an ``AssertionError`` with its command and the end of its stderr."""
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc
