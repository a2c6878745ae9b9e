"""The --tiny path of our systems in bench/grpo_vs_trl.py on CPU (TRL is not installed in CI)."""

from __future__ import annotations

import math

import pytest

from bench import grpo_vs_trl
from bench.common import hh_prompt_ids


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, left_tokenizer):
    path = tmp_path_factory.mktemp("grpo_bench_tok")
    left_tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("system", ["ours_grpo", "ours_ppo"])
def test_grpo_bench_ours_tiny_runs_two_steps(tok_dir, left_tokenizer, system):
    prompts = hh_prompt_ids(left_tokenizer, 32)[:16]
    args = grpo_vs_trl.build_parser().parse_args(
        ["--tiny", "--worker", system, "--config", "tiny", "--steps", "2", "--tokenizer", tok_dir]
    )
    res = grpo_vs_trl.run_ours(args, prompts, "grpo" if system == "ours_grpo" else "gae")
    sh = grpo_vs_trl.shape(args)
    assert len(res["step_times_s"]) == 2 and res["critic"] == (system == "ours_ppo")
    # K samples of every prompt, each with all its new tokens (EOS masked out)
    assert all(s["generated_tokens"] == sh["batch"] * sh["k"] * sh["new_tokens"] for s in res["steps"])
    assert set(res["median_phases_s"]) == {"generate", "score", "train", "sync"}
    assert all(math.isfinite(s["policy_loss"]) for s in res["steps"])
    assert all(
        (s["ref_kl"] is not None) == (system == "ours_grpo") for s in res["steps"]
    )  # KL as a loss term


def test_ratio_and_table():
    fast = {"median_step_s": 1.0, "generated_tokens_per_s": 10.0, "peak_allocated_gib": 2.0}
    slow = {"median_step_s": 5.0, "generated_tokens_per_s": 2.0, "peak_allocated_gib": 4.0}
    assert grpo_vs_trl.ratio(fast, slow) == {"speedup": 5.0, "memory_ratio": 0.5}
    assert grpo_vs_trl.ratio(fast, {"error": "worker exited with 1"}) is None
    table = grpo_vs_trl.markdown(
        {"systems": {"trl": slow, "ours_grpo": fast}, "vs_trl": grpo_vs_trl.ratio(fast, slow)}
    )
    assert "5.00x faster" in table and "0.50x the memory" in table
