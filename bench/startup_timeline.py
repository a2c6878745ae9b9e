"""Where a PPO run's time goes before its first step: runs a copy of ``recipes/ppo.py`` that prints
``T <label> <seconds since launch>`` before each numbered step of ``main()`` and at the start of each PPO
step, and writes those marks (plus the wall time) as JSON. Same arguments as the recipe::

    python bench/startup_timeline.py --out timeline.json -- --actor lm --reward-model rm ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_copy(source: str, cprofile: str | None = None) -> str:
    """The recipe's text with a timestamp print before every ``# N. ...`` comment of ``main()``; with
    ``cprofile`` (a path), ``main()`` runs under ``cProfile`` until its first PPO step, stats dumped there."""
    head, sep, body = source.partition("def main(cfg: PPOConfig) -> dict:\n")
    if not sep:
        raise SystemExit("recipes/ppo.py has no main(cfg: PPOConfig): update bench/startup_timeline.py")
    clock = '__import__("rlhf_kit.training.metrics").training.metrics.seconds_since_launch()'
    mark = "    print(f'T LABEL {" + clock + ":.2f}', flush=True)\n"
    body = re.sub(
        r"^(    # (\d+)\. [^\n]*)$",
        lambda m: mark.replace("LABEL", f"step{m.group(2)}") + m.group(1),
        body,
        flags=re.M,
    )
    body = body.replace(
        "        timer.reset()\n",
        mark.replace("    print", "        print").replace("LABEL", "ppo_step") + "        timer.reset()\n",
        1,
    )
    if cprofile:
        start = "    import cProfile\n    _prof = cProfile.Profile()\n    _prof.enable()\n"
        stop = (
            f"        if _prof is not None:\n            _prof.disable()\n"
            f"            _prof.dump_stats({cprofile!r})\n            _prof = None\n"
        )
        body = start + body.replace("        timer.reset()\n", stop + "        timer.reset()\n", 1)
    return head + sep + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cprofile", help="write cProfile stats of main() up to its first PPO step here")
    ap.add_argument("recipe_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.recipe_args[1:] if args.recipe_args[:1] == ["--"] else args.recipe_args
    with open(os.path.join(ROOT, "recipes", "ppo.py")) as f:
        text = timed_copy(f.read(), os.path.abspath(args.cprofile) if args.cprofile else None)
    with tempfile.NamedTemporaryFile(
        "w", suffix="_ppo_timed.py", dir=os.path.join(ROOT, "recipes"), delete=False
    ) as f:
        f.write(text)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, f.name, *rest], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    marks = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("T ")]
    result = {"rc": proc.returncode, "wall_s": time.time() - t0, "marks": [(k, float(v)) for k, v in marks]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    sys.stdout.write(proc.stdout[-3000:])
    sys.stderr.write(proc.stderr[-3000:])
    print(json.dumps(result["marks"]))


if __name__ == "__main__":
    main()
