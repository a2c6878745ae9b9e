"""Run recipe commands for the tests and collect each one's result.

CI has 2 cores. Independent recipe runs start at once (:func:`run_all`): each runs as its own fresh
process, in about half the wall time they take one after another. A recipe that stops on a configuration
error spends its ~7 s importing torch and transformers and milliseconds on the error, so a recipe's
configuration-error cases share one interpreter (:func:`run_bad_configurations`). Each test still checks
its own result.
"""

from __future__ import annotations

import json
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
    """Run ``script --output-dir <root>/case<i>/out <args>`` for every ``(args, message)`` of ``cases``:
    ``{tuple(args): (CompletedProcess, output dir)}``, for the recipes' one-line configuration-error tests.

    All cases run in one fresh interpreter, one after another (tests/recipes/cli_cases.py): each is the
    script run as ``__main__`` with its own arguments and its own stdout and stderr, and torch and
    transformers are imported once, not once per case (~7 s each on one core)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    outs = {tuple(args): root / f"case{i}" / "out" for i, (args, _) in enumerate(cases)}
    argvs = [["--output-dir", str(out), *key] for key, out in outs.items()]
    (root / "cases.json").write_text(json.dumps(argvs))
    driver = [sys.executable, str(Path(__file__).with_name("cli_cases.py")), str(script)]
    proc = run_all({"all": [*driver, str(root / "cases.json"), str(root / "results.json")]},
                   env=env, cwd=cwd, timeout=timeout)["all"]  # fmt: skip
    check_ok(proc)
    results = json.loads((root / "results.json").read_text())
    return {
        key: (subprocess.CompletedProcess([sys.executable, str(script), *argv], r["returncode"], r["stdout"],
                                          r["stderr"]), outs[key])
        for (key, argv, r) in zip(outs, argvs, results, strict=True)
    }  # fmt: skip


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc`` if it exited 0, else an ``AssertionError`` with its command and the end of its stderr."""
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc
