"""Runs that lose nothing: non-finite rewards and losses, used output directories, changed settings on
resume, bad numbers and inputs (the PPO recipe in-process where the CLI is not the point)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_kit.errors import ConfigError
from tests.recipes.procs import run_all, run_bad_configurations
from tests.recipes.test_ppo import ENV, FAST, RECIPE, metrics, series

ROOT = Path(__file__).resolve().parents[2]


def all_finite(directory: Path) -> bool:
    files = list(directory.rglob("*.safetensors"))
    assert files, directory
    return all(torch.isfinite(t).all() for f in files for t in load_file(str(f)).values())


@pytest.fixture(scope="module")
def nonfinite_runs(tmp_path_factory):
    """The two PPO runs below (a NaN reward once; huge rewards) are independent: they run at once, one
    thread each (CI has 2 cores). ``{name: (CompletedProcess, output dir)}``."""
    root = tmp_path_factory.mktemp("nonfinite")
    outs = {"nan": root / "nan", "huge": root / "huge"}
    args = {
        "nan": [*FAST, "--reward-fn", "tests.recipes.reward_fns:nan_once", "--max-steps", "2",
                "--save-interval", "1"],
        "huge": [*FAST, "--reward-fn", "tests.recipes.reward_fns:huge", "--max-steps", "4",
                 "--save-interval", "1", "--max-bad-steps", "1"],
    }  # fmt: skip
    procs = run_all(
        {k: [sys.executable, str(RECIPE), "--output-dir", str(outs[k]), *a] for k, a in args.items()},
        env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=900,
    )  # fmt: skip
    return {k: (procs[k], outs[k]) for k in outs}


def test_ppo_one_nan_reward_is_dropped_and_never_applied(nonfinite_runs):
    proc, out = nonfinite_runs["nan"]
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    rows = metrics(out)
    assert series(rows, "nonfinite/dropped_samples") == [1.0, 0.0]
    assert series(rows, "nonfinite/skipped_updates") == [0.0, 0.0]
    for key in ("value/loss", "policy/loss", "reward/score_mean", "policy/grad_norm"):
        assert all(math.isfinite(v) for v in series(rows, key)), key
    for d in ("checkpoints/step_1", "checkpoints/step_2", "final", "critic"):
        assert all_finite(out / d), d


def test_ppo_huge_rewards_stop_at_the_limit_naming_step_and_quantity(nonfinite_runs):
    proc, out = nonfinite_runs["huge"]
    last = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("ppo.py: error: step 2: non-finite 2 x grad_norm (TokenValueModel)=inf"), last
    assert "value/loss=inf" in last, last
    assert "(--max-bad-steps)" in last
    # step 1's critic update was skipped, so its checkpoint is clean; step 2 was never saved
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert all_finite(out / "checkpoints" / "step_1")
    assert series(metrics(out), "nonfinite/skipped_updates") == [2.0]  # both critic mini-batch steps


def ppo():
    from recipes import ppo as recipe

    return recipe


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("actor_lr", -1.0, "--actor-lr must be > 0, got -1.0"),
        ("critic_lr", float("nan"), "--critic-lr must be a finite number, got nan"),
        ("kl_coef", float("inf"), "--kl-coef must be a finite number, got inf"),
        ("actor_min_lr", -1e-6, "--actor-min-lr must be >= 0"),
        ("max_steps", 0, "--max-steps must be > 0, got 0"),
        ("lam", 1.5, r"--lam must be in \[0, 1\]"),
    ],
)
def test_ppo_numbers_are_checked_before_anything_is_built(tmp_path, field, value, message):
    recipe = ppo()
    with pytest.raises(ConfigError, match=message):
        recipe.validate(recipe.PPOConfig(output_dir=str(tmp_path), **{field: value}), 1)


def test_ppo_bad_prompt_line_and_non_model_actor_are_one_line_before_models(tmp_path):
    recipe = ppo()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: line is not valid JSON"):
        recipe.validate(recipe.PPOConfig(train_prompts=str(bad)), 1)
    not_model = tmp_path / "ckpt"
    not_model.mkdir()
    (not_model / "config.json").write_text("")  # what a kill mid-write used to leave
    with pytest.raises(ConfigError, match=r"ckpt/config.json: unreadable model config"):
        recipe.validate(recipe.PPOConfig(actor=str(not_model), reward_fn="m:f", critic=str(not_model)), 1)


def test_ppo_refuses_a_used_output_dir_and_changed_settings_on_resume(tmp_path):
    from rlhf_kit.training.run import start_run

    recipe = ppo()
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"used by an earlier run \(metrics.jsonl\); pass --resume"):
        recipe.main(recipe.PPOConfig(output_dir=str(used)))
    out = tmp_path / "run"
    start_run(recipe.PPOConfig(output_dir=str(out)), out, resume=False)  # what the first run stored
    changed = recipe.PPOConfig(output_dir=str(out), resume=True, actor_lr=2e-5, num_rollout_samples=32)
    with pytest.raises(ConfigError, match=r"--actor-lr: 1e-05 -> 2e-05; --num-rollout-samples: 16 -> 32"):
        recipe.main(changed)
    assert not (out / "init").exists()  # refused before any model was made


def test_cli_number_errors_are_one_line(tmp_path):
    """The reward-model CLI: --lr nan / inf stop with one line before any model is built."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [(["--lr", value], value) for value in ("nan", "inf")]
    runs = run_bad_configurations(ROOT / "recipes" / "reward_model.py", cases, tmp_path, env=env, cwd=ROOT)
    for args, value in cases:
        proc, out = runs[tuple(args)]
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0] == f"reward_model.py: error: --lr must be a finite number, got {value}"
        assert not (out / "tiny_reward").exists()
