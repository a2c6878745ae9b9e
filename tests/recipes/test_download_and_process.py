"""The HH preparation recipe, driven through its real command line."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf_kit import default_hh_file
from rlhf_kit.data import load_comparisons, load_prompts

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "download_and_process.py"


def run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_single_test_file_writes_only_test_split(tmp_path):
    source = tmp_path / "harmless-base-test.jsonl.gz"
    shutil.copy(default_hh_file(), source)
    out = tmp_path / "hh"
    stdout = run("--source", str(source), "--output-dir", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["test_comparisons.jsonl", "test_prompts.jsonl"]
    assert "no train split" in stdout
    assert "read 2312 pairs, kept 2299, dropped 13 (not_alternating: 9, empty_response: 4)" in stdout

    lines = [json.loads(line) for line in (out / "test_comparisons.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2299 and all(set(line) == {"text"} for line in lines)
    prompts = load_prompts(out / "test_prompts.jsonl")
    for (chosen, rejected), prompt in zip(load_comparisons(out / "test_comparisons.jsonl"), prompts):
        assert chosen.startswith(prompt + " ") and rejected.startswith(prompt + " ")
        assert prompt.startswith("User: ") and prompt.endswith("\n\nAssistant:")


def test_folder_source_keep_human_and_split_override(tmp_path):
    release = tmp_path / "release"
    (release / "helpful-base").mkdir(parents=True)
    (release / "red-team-attempts").mkdir()
    with gzip.open(default_hh_file(), "rt", encoding="utf-8") as f:
        rows = [f.readline() for _ in range(30)]
    for name, chunk in (("train.jsonl.gz", rows[:20]), ("test.jsonl.gz", rows[20:])):
        with gzip.open(release / "helpful-base" / name, "wt", encoding="utf-8") as f:
            f.writelines(chunk)
    with gzip.open(release / "red-team-attempts" / "red_team_attempts.jsonl.gz", "wt") as f:
        f.write(json.dumps({"transcript": "x"}) + "\n")
    out = tmp_path / "hh"
    stdout = run("--source", str(release), "--output-dir", str(out), "--keep-human")
    assert "skipping" in stdout and "red_team_attempts" in stdout
    train, test = (
        load_comparisons(out / "train_comparisons.jsonl"),
        load_comparisons(out / "test_comparisons.jsonl"),
    )
    assert (len(train), len(test)) == (20, 10)  # none of the first 30 pairs is malformed
    assert train[0][0].startswith("Human: ") and "\n\nUser:" not in train[0][0]

    forced = tmp_path / "forced"
    run(
        "--source",
        str(release / "helpful-base" / "test.jsonl.gz"),
        "--split",
        "train",
        "--output-dir",
        str(forced),
    )
    assert sorted(p.name for p in forced.iterdir()) == ["train_comparisons.jsonl", "train_prompts.jsonl"]


def test_source_default_builds_offline_train_and_test(tmp_path):
    out = tmp_path / "hh"
    stdout = run("--source", "default", "--output-dir", str(out), "--test-fraction", "0.2", "--seed", "1")
    assert "kept 2299" in stdout
    train, test = (
        load_comparisons(out / "train_comparisons.jsonl"),
        load_comparisons(out / "test_comparisons.jsonl"),
    )
    assert (len(train), len(test)) == (2299 - 460, 460)
    assert len(load_prompts(out / "train_prompts.jsonl")) == len(train)


def test_hub_source_offline_fails_fast_with_one_line(tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: the hub is unreachable
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "hh")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download_and_process.py: error: cannot reach"), (
        proc.stderr
    )
    assert f"127.0.0.1:{port}" in lines[0] and "--source default" in lines[0] and "--source PATH" in lines[0]
    assert not (tmp_path / "hh").exists()
