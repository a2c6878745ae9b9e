"""The harness of the recipes' configuration-error tests (tests/recipes/cli_cases.py): cases that share one
interpreter still get their own exit status and their own output, Python's and native code's alike, as
separate processes would."""

from __future__ import annotations

import os
import textwrap

from tests.recipes.procs import run_bad_configurations

SCRIPT = """\
import os, sys
from helper import VALUE  # a module beside the script: its folder is first on sys.path
args = sys.argv[1:]
assert args[0] == "--output-dir", args
kind = args[3]
print("out", kind, VALUE)
if kind == "fd":
    os.write(2, b"native line\\n")  # what C code or a child's inherited descriptor would print
    sys.stderr.write("python line\\n")
    raise SystemExit(2)
if kind == "message":
    sys.exit("stopped: " + kind)
if kind == "crash":
    raise RuntimeError("boom")
"""


def test_each_case_gets_its_own_status_and_output(tmp_path):
    folder = tmp_path / "script"
    folder.mkdir()
    (folder / "helper.py").write_text("VALUE = 7\n")
    (folder / "prog.py").write_text(textwrap.dedent(SCRIPT))
    cases = [(["--kind", k], k) for k in ("fd", "message", "crash", "fine")]
    runs = run_bad_configurations(
        folder / "prog.py", cases, tmp_path / "runs", env=dict(os.environ), cwd=tmp_path
    )
    got = {args[1]: runs[tuple(args)][0] for args, _ in cases}
    assert [got[k].returncode for k in ("fd", "message", "crash", "fine")] == [2, 1, 1, 0]
    for kind, proc in got.items():
        assert proc.stdout == f"out {kind} 7\n", (kind, proc.stdout)
    assert got["fd"].stderr.splitlines() == ["native line", "python line"]
    assert got["message"].stderr == "stopped: message\n"
    assert got["crash"].stderr.strip().splitlines()[-1] == "RuntimeError: boom"
    assert got["fine"].stderr == ""
    assert runs[("--kind", "fine")][1] == tmp_path / "runs" / "case3" / "out"
