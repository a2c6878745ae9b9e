"""The docs site (mkdocs.yml, docs/, the API reference from the docstrings) builds with --strict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # every page of the nav is there, and the API reference was generated from the docstrings
    for page in "recipes ppo server tutorial concepts ppo_guide multinode api/math api/training".split():
        assert (site / page / "index.html").is_file(), page
    math = (site / "api" / "math" / "index.html").read_text()
    assert "PPOPolicyLoss" in math and "ratio_eps" in math
    assert "write_model_card" in (site / "api" / "training" / "index.html").read_text()
