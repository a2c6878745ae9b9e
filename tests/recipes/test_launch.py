"""Launching the recipes: accelerate configs that leave the machine size to the launcher, and a
configuration error of an N-process job printed once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_accelerate_configs_leave_the_process_count_to_the_launcher():
    assert {p.name for p in CONFIGS} >= {"fsdp.yaml", "single.yaml"}
    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text())
        config = load_config_from_file(str(path))  # accelerate's own reader accepts the file
        if raw["distributed_type"] == "NO":
            assert raw.get("num_processes", 1) == 1, path.name  # one process by definition
            continue
        # no machine size: `accelerate launch --num_processes N` (and --num_machines) decide
        assert "num_processes" not in raw and "num_machines" not in raw, path.name
        assert config.num_processes == -1, path.name  # accelerate then insists on --num_processes
        assert "--num_processes" in path.read_text(), f"{path.name} does not show how to launch it"


def test_configuration_error_of_a_two_process_job_is_printed_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "recipes/ppo.py",
         "--temperature", "0", "--output-dir", str(tmp_path / "ppo")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "error: --temperature" in line]
    assert lines == ["ppo.py: error: --temperature must be > 0, got 0.0"], output[-3000:]
    assert not (tmp_path / "ppo").exists()  # stopped before any model was made
