"""The --tiny path of our side of the TRL benchmarks (bench/ppo_vs_trl.py, bench/rm_vs_trl.py) on CPU.

TRL itself is not installed in CI; these tests run only our systems, in-process, on tiny models.
"""

from __future__ import annotations

import math

import pytest

from bench import ppo_vs_trl, rm_vs_trl
from bench.common import hh_pair_examples, hh_prompt_ids, llama_config, median_after_warmup, run_worker


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, left_tokenizer):
    path = tmp_path_factory.mktemp("bench_tok")
    left_tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pairs(left_tokenizer):
    """Short HH pairs (both sides <= 128 tokens) keep the CPU steps fast."""
    return hh_pair_examples(left_tokenizer, 128)[:32]


def test_bench_configs_match_the_issue(left_tokenizer):
    a = llama_config("A", left_tokenizer)
    b = llama_config("B", left_tokenizer, num_labels=1)
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads) == (
        1024,
        16,
        16,
        8,
    )
    assert a.intermediate_size == 2816 and a.pad_token_id == left_tokenizer.pad_token_id
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.intermediate_size) == (
        2048,
        22,
        32,
        5632,
    )
    assert b.num_labels == 1


def test_ppo_ours_tiny_runs_two_steps(tok_dir, left_tokenizer):
    prompts = hh_prompt_ids(left_tokenizer, 32)[:16]
    assert max(len(p) for p in prompts) == 32
    args = ppo_vs_trl.build_parser().parse_args(["--tiny", "--worker", "ours", "--config", "tiny",
                                                 "--steps", "2", "--tokenizer", tok_dir])  # fmt: skip
    res = ppo_vs_trl.run_ours(args, prompts)
    assert len(res["step_times_s"]) == 2
    sh = ppo_vs_trl.shape(args)
    # no early stop: every prompt gets all its new tokens
    assert all(s["generated_tokens"] == sh["batch"] * sh["new_tokens"] for s in res["steps"])
    assert set(res["median_phases_s"]) == {"generate", "score", "train", "sync"}
    assert math.isclose(res["median_step_s"], res["step_times_s"][1])
    assert res["generated_tokens_per_s"] > 0
    assert all(math.isfinite(s["policy_loss"]) for s in res["steps"])


def test_micro_batches_respect_the_token_budget(pairs):
    examples = pairs
    idx = list(range(len(examples)))
    for packed in (False, True):
        micros = rm_vs_trl.micro_batches(examples, idx, 512, packed)
        assert sorted(i for m in micros for i in m) == idx  # every pair exactly once
        for m in micros:
            side = max(
                max(len(examples[i]["chosen_input_ids"]), len(examples[i]["rejected_input_ids"])) for i in m
            )
            real = sum(
                len(examples[i]["chosen_input_ids"]) + len(examples[i]["rejected_input_ids"]) for i in m
            )
            cost = real if packed else 2 * len(m) * side
            assert cost <= 512 or len(m) == 1


@pytest.mark.parametrize("packed", [False, True])
def test_rm_ours_tiny_runs(tok_dir, pairs, packed):
    args = rm_vs_trl.apply_tiny(rm_vs_trl.build_parser().parse_args(["--tiny", "--tokenizer", tok_dir]))
    res = rm_vs_trl.run_ours(args, pairs, packed=packed)
    assert res["timed_steps"] == 1 and len(res["steps"]) == 2
    assert all(s["pairs"] == 8 for s in res["steps"])
    assert res["pairs_per_s"] > 0
    assert res["median_step_s"] == res["steps"][1]["step_s"]
    assert res["frames_compiled_in_timed_steps"] == 0  # nothing compiles on the tiny CPU run
    if packed:
        assert res["padding_fraction"] == 0
    assert all(math.isfinite(s["loss"]) for s in res["steps"])


def test_median_after_warmup():
    assert median_after_warmup([9.0, 1.0, 3.0, 2.0], 1) == 2.0
    assert math.isnan(median_after_warmup([1.0], 1))


def test_nan_probe_runs_every_backend_on_cpu(tmp_path):
    """bench/nan_probe.py (the GPU NaN diagnosis of issue 5) on CPU: one row per SDPA kernel and grad
    mode; kernels CPU lacks are recorded as errors, the math kernel and the padding-safe choice are finite."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "probe.jsonl"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "nan_probe.py"), "--device", "cpu", "--layers", "1", "--tiny", "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["backend"], r["grad"]) for r in rows} == {
        (b, g)
        for b in ("default", "flash", "efficient", "cudnn", "math", "padding_safe_sdpa")
        for g in (False, True)
    }
    for r in rows:
        if r["backend"] in ("math", "padding_safe_sdpa"):
            assert "error" not in r and r["lp_nonfinite_real"] == 0 and r["val_nonfinite_real"] == 0, r
            if r["grad"]:
                assert r["grad_nonfinite_params"] == 0, r


def test_optimizer_step_bench_reports_each_variant_on_cpu(tmp_path):
    """bench/optimizer_step.py's CPU dry run (torchao's variant, which compiles per shape, left to the GPU
    call): our 8-bit state is 2.03 bytes a value (codes plus one fp32 scale per 256), the master-weight
    AdamW's 12 (fp32 master and two moments)."""
    from bench import optimizer_step

    out = optimizer_step.main(
        ["--config", "tiny", "--variants", "ours_eager", "master_fused", "--steps", "2", "--warmup", "1",
         "--out", str(tmp_path / "opt.json")]
    )  # fmt: skip
    ours, master = out["variants"]["ours_eager"], out["variants"]["master_fused"]
    assert 2.03 <= ours["state_bytes_per_param"] < 2.1 and master["state_bytes_per_param"] == 12.0
    assert ours["trained_params"] == master["trained_params"] > 0 and ours["median_step_s"] > 0
    assert (tmp_path / "opt.json").exists() and "agreement_vs_torchao" not in out


def test_ppo_ours_tiny_packed_passes_match_the_padded_ones(tok_dir, left_tokenizer):
    """The whole PPO step (scoring, advantages, update) with --packed-passes: the same losses and values
    as the padded passes, step after step (fp32 on CPU, same seed)."""
    prompts = hh_prompt_ids(left_tokenizer, 32)[:16]
    runs = []
    for extra in (["--packed-passes", "off"], ["--packed-passes", "on"]):
        args = ppo_vs_trl.build_parser().parse_args(["--tiny", "--worker", "ours", "--config", "tiny",
                                                     "--steps", "2", "--tokenizer", tok_dir, *extra])  # fmt: skip
        runs.append(ppo_vs_trl.run_ours(args, prompts))
    assert [r["packed_passes"] for r in runs] == ["off", "on"]
    for padded, packed in zip(runs[0]["steps"], runs[1]["steps"]):
        for key in ("policy_loss", "value_loss", "kl"):
            assert math.isclose(padded[key], packed[key], rel_tol=1e-4, abs_tol=1e-6), (key, padded, packed)


def test_a_pass_that_fails_after_the_timed_steps_keeps_them(tok_dir, left_tokenizer, monkeypatch):
    """The extra passes (profiles, cProfile) run after the timed steps; each is preceded by a save of the
    results so far, naming the pass, so a pass that kills the process loses only itself."""
    prompts = hh_prompt_ids(left_tokenizer, 32)[:16]
    args = ppo_vs_trl.build_parser().parse_args(["--tiny", "--worker", "ours", "--config", "tiny",
                                                 "--steps", "2", "--cprofile", "1", "--tokenizer", tok_dir])  # fmt: skip

    def crash(*a, **k):
        raise RuntimeError("free(): invalid next size (fast)")

    monkeypatch.setattr(ppo_vs_trl, "host_profile", crash)
    saved = []
    with pytest.raises(RuntimeError, match="invalid next size"):
        ppo_vs_trl.run_ours(args, prompts, saved.append)
    assert len(saved) == 1 and saved[0]["pending"] == "cprofile"
    assert len(saved[0]["step_times_s"]) == 2 and "cprofile" not in saved[0]


def test_run_worker_keeps_what_a_crashed_worker_saved(tmp_path):
    """A worker that saved its results and then died (SIGABRT) still reports them, with the error."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import json, os, sys\n"
        "path = sys.argv[sys.argv.index('--result') + 1]\n"
        "json.dump({'median_step_s': 0.25, 'pending': 'trace_gaps'}, open(path, 'w'))\n"
        "print('timed steps done', flush=True)\n"
        "os.abort()\n"
    )
    res = run_worker(str(script), [], str(tmp_path / "r.json"), timeout=60)
    assert res["median_step_s"] == 0.25 and res["error"] == "worker exited with -6"
    assert "timed steps done" in res["log_tail"]
    table = ppo_vs_trl.markdown({"configs": [{"config": "A", "ours": {**res, "generated_tokens_per_s": 1.0,
                                                                       "peak_allocated_gib": 1.0}}]})  # fmt: skip
    assert "trace_gaps failed: worker exited with -6" in table and "| A | ours | 0.250 |" in table
    (tmp_path / "r.json").unlink()
    script.write_text("import os\nos.abort()\n")  # nothing saved: the error alone
    bare = run_worker(str(script), [], str(tmp_path / "r.json"), timeout=60)
    assert set(bare) == {"error", "wall_s", "log_tail"}
