"""Run several recipe subprocesses at once and collect each one's result.

CI has 2 cores, and a recipe subprocess that stops on a configuration error spends its ~7 s importing
torch and transformers on one core: started together, such commands take about half the wall time they
take one after another. Each command still runs as its own fresh process, and each test still checks
its own result.
"""

from __future__ import annotations

import subprocess
from collections.abc import Hashable, Mapping


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
