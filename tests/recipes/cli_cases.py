"""Run one recipe script's command line once per argument list, all in this one interpreter.

    python tests/recipes/cli_cases.py SCRIPT CASES.json RESULTS.json

``CASES.json`` is a list of argument lists. Each case runs ``SCRIPT`` as ``__main__`` (``runpy``, which is
how ``python SCRIPT args`` runs it) with ``sys.argv = [SCRIPT, *args]``, its file descriptors 1 and 2
redirected to files of its own, so what the case printed (Python or native code) is its output and no
other case's. ``RESULTS.json`` gets ``{"returncode", "stdout", "stderr"}`` per case, in order; the exit
status is what the process would have returned (``SystemExit``'s code; 1 and a traceback for any other
exception).

A recipe that stops on a configuration error spends about 7 s importing torch and transformers and
milliseconds on the error: importing once for all of a recipe's cases keeps its test seconds, not a
minute, on CI's 2 cores (tests/recipes/procs.py).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback


def run_case(script: str, args: list[str]) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if isinstance(e.code, str):  # sys.exit("message"): Python prints it and exits 1
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  (an uncaught exception: the traceback, exit status 1)
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        out.seek(0)
        err.seek(0)
        return {"returncode": code, "stdout": out.read(), "stderr": err.read()}


def main() -> None:
    script, cases_file, results_file = sys.argv[1:4]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as for `python SCRIPT`: its folder first
    with open(cases_file) as f:
        cases = json.load(f)
    results = [run_case(script, args) for args in cases]
    with open(results_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
