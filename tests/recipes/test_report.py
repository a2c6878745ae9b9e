"""The quickstart report (recipes/report.py, rlhf_kit.report) from stage outputs written by the recipes'
own writers, and the closing summary every recipe prints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_kit.data.hh import prepare_default_hh
from rlhf_kit.errors import DataError
from rlhf_kit.policy_eval import write_eval
from rlhf_kit.report import StageDirs, write_report
from rlhf_kit.tiny import save_tiny_pretrained, train_tokenizer
from rlhf_kit.training.metrics import MetricsLogger
from rlhf_kit.training.run import write_json
from rlhf_kit.training.summary import format_summary

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VAL = {2: (-0.25, 0.0), 4: (0.125, 0.5), 6: (0.375, 1.25)}  # step -> (val score, val KL)
EVAL = {
    "num_prompts": 64,
    "reward_mean": 0.3125,
    "baseline_reward_mean": 0.0625,
    "win_rate_vs_baseline": 0.546875,
}


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> Path:
    """A quickstart root whose files have the recipes' formats: models saved like the recipes save
    them, eval_results.json / metrics.jsonl / eval.json through the writers the recipes call."""
    root = tmp_path_factory.mktemp("quickstart")
    dirs = StageDirs.under(root)
    prepare_default_hh(dirs.data)  # download_and_process.py --source default
    tok = train_tokenizer()
    for d, kind in ((dirs.sft, "causal_lm"), (dirs.rm, "reward"), (dirs.ppo, "causal_lm")):
        save_tiny_pretrained(str(d / "final"), kind, tokenizer=tok, seed=0)
    test = {"loss": 0.6, "accuracy": 0.5859375, "reward_mean": 0.1, "reward_std": 1.0, "num_pairs": 231}
    write_json(dirs.rm / "eval_results.json", {"val": {**test, "accuracy": 0.55}, "test": test})
    with MetricsLogger(dirs.ppo) as logger:  # train rows every step, validation rows as ppo.py logs them
        for step in range(1, 7):
            logger.log({"reward/score_mean": 9.0, "kl/seq_mean": 9.0}, step)
            if step in VAL:
                score, kl = VAL[step]
                logger.log({"val/reward/score_mean": score, "val/kl/seq_mean": kl}, step)
                logger.log_table(
                    "val/samples", [[step, "p", "r", score]], ["step", "prompt", "response", "score"], step
                )
    write_eval(
        dirs.eval, {"num_prompts": 64}, EVAL, [{"prompt": "p", "response": "r", "score": 0.0, "length": 3}]
    )
    return root


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "report.py"), *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip


def test_report_gives_the_stage_numbers_and_a_png(stages, tmp_path):
    out = tmp_path / "report.md"
    proc = report_cli("--root", str(stages), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text in proc.stdout and f"wrote {out}" in proc.stdout
    for stage, made in (
        ("sft", "sft/final"),
        ("reward_model", "rm/final"),
        ("ppo", "ppo/final"),
        ("evaluate", "eval/eval.json"),
    ):
        assert f"| {stage} | `{stages / made.split('/')[0]}` | `{stages / made}` |" in text
    assert "Reward model test accuracy: 0.5859 on 231 held-out pairs" in text  # test, not val (0.55)
    assert "step 2 -> 6: mean score -0.2500 -> 0.3750, KL to the reference 0.0000 -> 1.2500" in text
    assert "over the SFT policy: 0.5469 on 64 test prompts (mean reward 0.3125 vs 0.0625" in text
    from transformers import AutoModelForCausalLM

    params = AutoModelForCausalLM.from_pretrained(stages / "sft" / "final").num_parameters()  # the real count
    assert f"tiny models ({params:,} parameters)" in text and "win rate near 0.5" in text
    png = tmp_path / "ppo_validation.png"
    assert "![PPO validation reward and KL](ppo_validation.png)" in text
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    from PIL import Image

    with Image.open(png) as im:
        im.verify()  # a complete, decodable PNG
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


def test_without_matplotlib_one_line_says_so_and_the_rest_is_there(stages, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    text, path = write_report(StageDirs.under(stages), tmp_path / "report.md")
    assert (
        "PPO validation curves: not plotted: matplotlib is not installed (pip install 'rlhf-kit[plot]')."
        in text
    )
    assert not (tmp_path / "ppo_validation.png").exists() and "0.5859" in text and "0.5469" in text
    assert path.read_text() == text


@pytest.mark.parametrize(
    "remove,message",
    [
        ("rm/eval_results.json", "missing (the reward model's test metrics"),
        ("eval/eval.json", "missing (the evaluation"),
        ("ppo/metrics.jsonl", "missing (the PPO run's metrics"),
        ("sft/final/config.json", "missing (the sft model"),
        ("data/test_prompts.jsonl", "missing (download_and_process.py's output)"),
    ],
)
def test_a_missing_stage_output_is_named(stages, tmp_path, remove, message):
    root = tmp_path / "root"
    shutil.copytree(stages, root)
    (root / remove).unlink()
    with pytest.raises(DataError) as info:
        write_report(StageDirs.under(root), root / "report.md")
    assert str(info.value).startswith(f"{root / remove}: {message}"), info.value
    assert not (root / "report.md").exists()


def test_the_cli_stops_with_one_line_naming_the_missing_file(tmp_path):
    proc = report_cli("--root", str(tmp_path))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"report.py: error: {tmp_path / 'data' / 'train_comparisons.jsonl'}: missing")


def test_a_reward_model_run_without_test_data_is_named(stages, tmp_path):
    rm = tmp_path / "rm"
    (rm / "final").mkdir(parents=True)
    (rm / "final" / "config.json").write_text("{}")
    write_json(rm / "eval_results.json", {"val": {"accuracy": 0.5}})
    proc = report_cli("--root", str(stages), "--rm-dir", str(rm), "--output", str(tmp_path / "r.md"))
    assert proc.returncode == 2
    assert f"{rm / 'eval_results.json'}: field 'test' missing" in proc.stderr


def test_closing_summary_format():
    text = format_summary(
        "reward_model", {"final model": Path("o/final"), "metrics": "o/metrics.jsonl"},
        {"val": {"accuracy": 0.5, "num_pairs": 8}, "test": {"accuracy": 2 / 3}},
    )  # fmt: skip
    assert text.splitlines() == [
        "reward_model: done",
        "  final model    o/final",
        "  metrics        o/metrics.jsonl",
        "  val/accuracy   0.5000",
        "  val/num_pairs  8",
        "  test/accuracy  0.6667",
    ]
