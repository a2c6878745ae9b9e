"""kill -9 at random points of the reward-model recipe's embedded default; resumes lose nothing.

Each case runs the recipe under tests/recipes/killer.py, which SIGKILLs it at a randomly chosen file
operation of one category: setup (the tiny model, the data, the stored configuration), a checkpoint
save (a half-written file is left behind), pruning (an old checkpoint half deleted) or the final
model. Every run passes --resume; the last one runs to the end, and its final weights and metrics
must equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
KILLER = ROOT / "tests" / "recipes" / "killer.py"
RECIPE = ROOT / "recipes" / "reward_model.py"
ARGS = ["--max-steps", "4", "--micro-batch-size", "4", "--global-batch-size", "4", "--max-length", "64",
        "--val-size", "8", "--eval-batch-size", "8", "--save-interval", "1", "--keep-last", "1",
        "--val-check-interval", "2", "--resume"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def command(out: Path, kill_at: str | None = None, log: Path | None = None) -> tuple[list[str], dict]:
    env = {**ENV, **({"KILL_AT": kill_at} if kill_at else {}), **({"KILL_LOG": str(log)} if log else {})}
    return [sys.executable, str(KILLER), str(RECIPE), "--output-dir", str(out), *ARGS], env


def check(proc: subprocess.Popen, kill_at: str | None) -> int:
    _, err = proc.communicate(timeout=300)
    if proc.returncode not in (0, -9):
        raise AssertionError(f"run (kill at {kill_at}) failed ({proc.returncode}):\n{err[-3000:]}")
    return proc.returncode


def launch(out: Path, kill_at: str | None = None, log: Path | None = None) -> subprocess.Popen:
    cmd, env = command(out, kill_at, log)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without wall-clock values."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(x).items() if k.split("/")[0] not in ("time", "throughput")}
        for x in lines
    ]


def test_random_kills_during_setup_saves_and_pruning_lose_nothing(tmp_path):
    seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    full, log, out = tmp_path / "full", tmp_path / "ops.log", tmp_path / "killed"
    uninterrupted = launch(full, log=log)
    # a kill in setup (the tiny model, the data, the stored configuration: at least 6 operations),
    # alongside the uninterrupted run (CI has 2 cores)
    plan = [("setup", rng.randint(1, 6))]
    first = launch(out, f"setup:{plan[0][1]}")
    assert check(uninterrupted, None) == 0
    outcome = [(*plan[0], "killed" if check(first, "setup") == -9 else "finished")]
    counts = Counter(line.split("\t")[0] for line in log.read_text().splitlines())
    # then two of: a checkpoint save, pruning, the final model, in a random order
    later = [("save", rng.randint(1, counts["save"] // 2)), ("prune", rng.randint(1, 2)), ("final", 1)]
    rng.shuffle(later)
    for kind, n in later[:2]:
        rc = check(launch(out, f"{kind}:{n}"), kind)
        outcome.append((kind, n, "killed" if rc == -9 else "finished"))
        assert not list(out.glob("checkpoints/step_*/.*")), "a half-written file inside a checkpoint"
    assert check(launch(out), None) == 0
    why = f"KILL_SEED={seed}: {outcome}"
    assert sum(o[2] == "killed" for o in outcome) >= 2, why
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (full, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), why
    assert rows(out) == rows(full), why
    assert json.loads((out / "eval_results.json").read_text()) == json.loads(
        (full / "eval_results.json").read_text()
    )
    leftovers = [p.name for p in out.rglob(".*") if p.name.startswith((".tmp", ".trash", ".step_"))]
    assert not leftovers, (why, leftovers)
