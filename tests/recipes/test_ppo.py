"""The PPO recipe through its real CLI on tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.recipes.procs import run_all, run_bad_configurations

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "ppo.py"
FAST = [
    "--max-new-tokens",
    "8",
    "--num-rollout-samples",
    "8",
    "--global-batch-size",
    "4",
    "--micro-batch-size",
    "2",
]
LEARN = [
    "--reward-fn", "tests.recipes.reward_fns:space_fraction",
    "--max-steps", "20", "--actor-lr", "2e-3", "--critic-lr", "2e-3", "--actor-min-lr", "1e-4",
    "--critic-min-lr", "1e-4", "--max-new-tokens", "12", "--num-rollout-samples", "32",
    "--global-batch-size", "16", "--micro-batch-size", "8", "--rollout-micro-batch-size", "16",
    "--val-check-interval", "10", "--num-val-samples", "16", "--ppo-epochs", "2", "--save-interval", "100",
]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(RECIPE), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def run_parallel(*arg_lists: list[str]) -> None:
    """Run several single-threaded recipe processes at once (CI has 2 cores)."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(RECIPE), *a], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for a in arg_lists
    ]  # fmt: skip
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise AssertionError(f"recipe failed ({p.returncode}):\n{out[-3000:]}\n{err[-3000:]}")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default (no model/data arguments), 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ppo_default")
    proc = run("--output-dir", str(out), *FAST)
    (out.parent / "ppo_default.log").write_text(proc.stdout + proc.stderr)  # beside the run, not in it
    return out


def test_default_run_writes_models_metrics_and_checkpoints(default_run):
    out = default_run
    rows = metrics(out)
    steps = series(rows, "reward/score_mean")
    assert len(steps) == 4
    for key in (
        "kl/seq_mean", "policy/clip_fraction", "policy/approx_kl", "policy/entropy", "value/loss",
        "values/explained_variance", "advantages/mean", "response/length_mean", "time/generate",
        "time/score", "time/train", "throughput/generated_tokens_per_s",
    ):  # fmt: skip
        assert len(series(rows, key)) == 4, key
    assert series(rows, "val/reward/score_mean"), "validation ran"
    # the update's token budget: micro-batches of 2 at full length (128 + 8); it grows on a GPU only
    assert series(rows, "batch/micro_batch_tokens") == [2 * 136] * 4
    extra = torch.load(out / "checkpoints" / "step_4" / "extra.pt", weights_only=True)
    assert extra["micro_batch_budget"] == {"tokens": 272, "measured": False, "updates": 4, "bytes_per_token": 0.0}
    assert any(r.get("table") == "val/samples" and r["rows"] for r in rows)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["test_prompts.jsonl", "train_prompts.jsonl"]
    actor = AutoModelForCausalLM.from_pretrained(out / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert critic.config.num_labels == 1
    # the final actor equals the last checkpoint's and differs from the initial actor
    ckpt = load_file(str(out / "checkpoints" / "step_4" / "models" / "actor" / "model.safetensors"))
    init = AutoModelForCausalLM.from_pretrained(out / "init" / "actor").state_dict()
    for name, p in actor.state_dict().items():
        torch.testing.assert_close(p, ckpt[name])
    assert any(not torch.equal(p, init[n]) for n, p in actor.state_dict().items())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    # four models loaded and saved, and not one of transformers' per-file bars (only the recipe's own)
    log = (out.parent / "ppo_default.log").read_text()
    assert "Loading weights" not in log and "Writing model shards" not in log and "ppo:" in log


def test_resume_equals_uninterrupted(default_run, tmp_path):
    """Resume from the uninterrupted run's step-2 checkpoint: steps 3-4 and the final weights match."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(default_run / "init", out / "init")
    shutil.copytree(default_run / "data", out / "data")
    shutil.copytree(default_run / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    (out / "checkpoints" / "latest").write_text("step_2\n")
    run("--output-dir", str(out), *FAST, "--resume")
    full, resumed = metrics(default_run), metrics(out)
    for key in ("reward/score_mean", "policy/loss", "value/loss", "kl/seq_mean"):
        assert series(resumed, key) == pytest.approx(series(full, key)[2:], rel=1e-5, abs=1e-6), key
    a = AutoModelForCausalLM.from_pretrained(default_run / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "flags, held",
    [
        (["--master-weights"], "fp32 masters"),
        (["--optimizer", "adamw8bit"], "8-bit AdamW moments"),
        (  # packed, as on a GPU: the FP8 layers' own config must not turn packing away
            ["--master-weights", "--fp8-backward", "all", "--packed-passes", "on"],
            "fp32 masters; FP8 weight and input gradients",
        ),
    ],
    ids=["master_weights", "adamw8bit", "fp8_backward"],
)
def test_bf16_weight_runs_resume_exactly(default_run, tmp_path, flags, held):
    """--master-weights (fp32 masters in the optimizer state) and --optimizer adamw8bit (8-bit moments,
    stochastic rounding): bf16 actor/critic, and a bf16 reference (rounded as the actor was), so the KL
    is exactly 0 before the first update; a resumed run ends with the uninterrupted run's weights. With
    --fp8-backward the forward pass is unchanged (the KL still exactly 0), and the saved models are plain."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for out in (full, resumed):
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(default_run / "init", out / "init")
        shutil.copytree(default_run / "data", out / "data")
    log = run("--output-dir", str(full), *FAST, *flags).stdout
    placed = (
        "models after placement: actor bfloat16 (trainable), critic bfloat16 (trainable), reference bfloat16"
    )
    assert placed in log
    assert log.split("models after placement:")[1].splitlines()[0].endswith(held)
    assert series(metrics(full), "kl/seq_mean")[0] == 0.0  # an fp32 reference gave bf16 noise here
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    (resumed / "checkpoints" / "latest").write_text("step_2\n")
    run("--output-dir", str(resumed), *FAST, *flags, "--resume")
    assert series(metrics(resumed), "value/loss") == pytest.approx(
        series(metrics(full), "value/loss")[2:], rel=1e-5
    )
    a = AutoModelForCausalLM.from_pretrained(full / "final")
    b = AutoModelForCausalLM.from_pretrained(resumed / "final")
    assert a.dtype == torch.bfloat16
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    # training moved the policy away from its initial weights
    init = AutoModelForCausalLM.from_pretrained(full / "init" / "actor", dtype=torch.bfloat16).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory):
    free = tmp_path_factory.mktemp("ppo_free")
    tight = tmp_path_factory.mktemp("ppo_tight")
    run_parallel(
        ["--output-dir", str(free), *LEARN, "--kl-coef", "0.0"],
        ["--output-dir", str(tight), *LEARN, "--kl-coef", "10.0", "--kl-estimator", "k3"],
    )
    return metrics(free), metrics(tight)


def test_reward_rises_with_a_rule_based_reward(learning_runs):
    free, _ = learning_runs
    scores = series(free, "reward/score_mean")
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.025, (first, last, scores)
    val = series(free, "val/reward/score_mean")
    assert val[-1] > val[0], val


def test_large_kl_coefficient_keeps_policy_close(learning_runs):
    free, tight = learning_runs
    # Adam steps on whitened advantages make both runs drift; the penalty must hold the tight one back.
    kl_free = sum(series(free, "kl/seq_mean")[-10:]) / 10
    kl_tight = sum(series(tight, "kl/seq_mean")[-10:]) / 10
    assert kl_tight < 0.75 * kl_free, (kl_tight, kl_free)


BAD_CONFIGURATIONS = [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], "not divisible"),
    (["--num-rollout-samples", "12", "--global-batch-size", "8"], "must be a multiple of"),
    (["--train-prompts", "/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl"),
    (["--actor", "/nonexistent/actor"], "/nonexistent/actor"),
    (["--reward-fn", "no_colon_here"], "module:function"),
    (["--master-weights", "--fsdp"], "--master-weights is for one process"),
    (["--optimizer", "adamw8bit", "--master-weights"], "adamw8bit keeps bf16 weights and no fp32 masters"),
    (["--optimizer", "adamw8bit", "--lora-r", "4"], "adamw8bit trains all weights"),
    (["--fp8-backward", "weights"], "--fp8-backward needs bf16 trained weights: --master-weights"),
    (["--fp8-backward", "all", "--master-weights", "--lora-r", "4"], "LoRA's adapters are not (drop --lora-r)"),
    (["--report-to", "jsonl", "nosuch"], "--report-to nosuch: unknown tracker; choose from jsonl, aim"),
    (["--score-in-update", "on", "--ppo-epochs", "2"], "--score-in-update on needs --advantage-estimator gae"),
]


@pytest.fixture(scope="module")
def bad_configuration_runs(tmp_path_factory):
    """Every case of test_bad_configuration_stops_with_one_line, each its own CLI process, started at
    once (each is ~7 s of imports on one core): ``{args: (CompletedProcess, output dir)}``."""
    return run_bad_configurations(
        RECIPE, BAD_CONFIGURATIONS, tmp_path_factory.mktemp("ppo_bad"), env=ENV, cwd=ROOT
    )


@pytest.mark.parametrize("args,message", BAD_CONFIGURATIONS)
def test_bad_configuration_stops_with_one_line(bad_configuration_runs, args, message):
    proc, out = bad_configuration_runs[tuple(args)]
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr
    assert not (out / "init").exists()  # nothing was built or loaded


PROMPTS = [f"Human: tell me about item{i:02d} please\n\nAssistant:" for i in range(24)]


@pytest.fixture(scope="module")
def independent_runs(tmp_path_factory):
    """Three recipe runs that share nothing, started at once, one thread each (CI has 2 cores): 2 steps on
    given training prompts (``held_out``), a --val-size that leaves no training prompts (``no_training``)
    and 2 steps on a checkpoint set up like a real one (``real_like``). ``{name: (proc, dir)}``: each
    test checks its own."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_kit.data.formats import write_prompts
    from rlhf_kit.data.hh import prepare_default_hh
    from rlhf_kit.tiny import save_real_like_checkpoint

    root = tmp_path_factory.mktemp("ppo_independent")
    dirs = {name: root / name for name in ("held_out", "no_training", "real_like", "scored_first", "in_update")}
    for d in dirs.values():
        d.mkdir()
    write_prompts(dirs["held_out"] / "prompts.jsonl", PROMPTS)
    few = [f"Human: question {i}\n\nAssistant:" for i in range(5)]
    write_prompts(dirs["no_training"] / "prompts.jsonl", few)
    actor = save_real_like_checkpoint(str(dirs["real_like"] / "actor"), pad="none")
    critic = dirs["real_like"] / "critic"
    AutoModelForSequenceClassification.from_pretrained(actor, num_labels=1).save_pretrained(critic)
    data = prepare_default_hh(dirs["real_like"] / "data", messages=True)
    args = {
        "held_out": ["--output-dir", str(dirs["held_out"] / "o"), "--train-prompts",
                     str(dirs["held_out"] / "prompts.jsonl"), "--val-size", "6", "--num-val-samples", "6",
                     "--max-steps", "2", "--seed", "3", "--old-logprobs", "sampler", *FAST],
        "no_training": ["--output-dir", str(dirs["no_training"] / "o"), "--train-prompts",
                        str(dirs["no_training"] / "prompts.jsonl"), "--val-size", "5"],
        "real_like": ["--actor", actor, "--critic", str(critic), "--reward-model", actor,
                      "--train-prompts", data["train_prompts"],
                      "--val-prompts", data["test_prompts"], "--output-dir", str(dirs["real_like"] / "out"),
                      "--max-steps", "2", "--val-check-interval", "2", "--num-val-samples", "4",
                      "--packed-passes", "on", "--gradient-checkpointing", *FAST],
        **{name: ["--output-dir", str(dirs[name] / "o"), "--max-steps", "2", "--max-new-tokens", "8",
                  "--num-rollout-samples", "8", "--global-batch-size", "8", "--micro-batch-size", "8",
                  "--micro-batch-tokens", "0", "--val-check-interval", "2", "--num-val-samples", "4",
                  "--score-in-update", "on" if name == "in_update" else "off"]
           for name in ("scored_first", "in_update")},
    }  # fmt: skip
    procs = run_all(
        {name: [sys.executable, str(RECIPE), *a] for name, a in args.items()},
        env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=900,
    )  # fmt: skip
    return {name: (procs[name], dirs[name]) for name in dirs}


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(
            f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def test_validation_prompts_are_held_out_of_the_given_training_prompts(independent_runs):
    """--train-prompts without --val-prompts: --val-size of them validate (seeded), the rest train, a line
    says so, and no shipped-HH data/ folder appears in the output dir. (This run also takes the old
    log-probs from the sampler: --old-logprobs sampler through the CLI.)"""
    from rlhf_kit.ppo import split_prompts

    proc, d = independent_runs["held_out"]
    check_ok(proc)
    path, out = d / "prompts.jsonl", d / "o"
    assert (
        f"held out 6 of the 24 prompts of {path} for validation (seed 3); 18 left for training" in proc.stdout
    )
    assert not (out / "data").exists()
    closing = proc.stdout[proc.stdout.index("ppo: done") :]  # the closing summary: paths, then numbers
    assert re.search(rf"^  final model +{re.escape(str(out / 'final'))}$", closing, re.M), closing
    assert re.search(r"^  val/reward/score_mean +-?\d+\.\d{4}$", closing, re.M), closing
    held = [p.split()[4] for p in split_prompts(PROMPTS, 6, seed=3)[1]]  # the itemNN marker of each
    table = next(r for r in metrics(out) if r.get("table") == "val/samples")  # its first 4 samples
    assert [next(w for w in row[1].split() if w.startswith("item")) for row in table["rows"]] == held[:4]


def test_scoring_in_the_update_runs_as_scoring_first(independent_runs):
    """--score-in-update on (one micro-batch of 8: the update's own forward scores it) against the same run
    scoring first (off; auto is off on the CPU): the same rewards, KL, losses and final weights, and a ratio of exactly 1."""
    first, inside = (metrics(check_ok(independent_runs[n][0]) and independent_runs[n][1] / "o")
                     for n in ("scored_first", "in_update"))  # fmt: skip
    for key in ("reward/score_mean", "kl/seq_mean", "policy/loss", "value/loss", "advantages/std"):
        assert series(inside, key) == pytest.approx(series(first, key), rel=1e-4, abs=1e-6), key
    assert series(inside, "policy/ratio_mean") == [1.0, 1.0]
    assert series(inside, "val/kl/seq_mean") == pytest.approx(series(first, "val/kl/seq_mean"), rel=1e-4, abs=1e-6)
    a, b = (AutoModelForCausalLM.from_pretrained(independent_runs[n][1] / "o" / "final").state_dict()
            for n in ("scored_first", "in_update"))  # fmt: skip
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_val_size_leaving_no_training_prompts_stops_with_one_line(independent_runs):
    proc, d = independent_runs["no_training"]
    path = d / "prompts.jsonl"
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert f"{path}: --val-size 5 must be >= 1 and leave training prompts (5 in the file)" in err[0]
    assert not (d / "o" / "init").exists()  # before any model is built


def test_evaluate_recipe_on_the_ppo_run(default_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "evaluate.py"), "--ppo-dir", str(default_run),
         "--output-dir", str(tmp_path), "--num-prompts", "4", "--max-new-tokens", "6"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    summary = report["summary"]
    assert summary["num_prompts"] == 4 and len(report["samples"]) == 4
    assert 0.0 <= summary["win_rate_vs_baseline"] <= 1.0
    assert "kl_to_reference_mean" in summary and "win_rate_vs_baseline" in proc.stdout
    assert all("baseline_response" in s for s in report["samples"])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--backend", "compiled", "--dynamic-dispatch"],
        ["--fsdp", "--backend", "compiled", "--dynamic-dispatch", "--micro-batch-tokens", "150"],
    ],
    ids=["ddp-static", "ddp-dynamic", "fsdp2-dynamic-token-budget"],
)
def test_two_processes(tmp_path, extra):
    """2 processes (accelerate MULTI_CPU, DDP over gloo): the run completes with a fixed slice of
    the rollout per rank, or with micro-batches handed out dynamically and rebalanced (compiled backend
    syncing weights from the DDP actor), and rank 0 logs the all-rank means. Under FSDP2 the training
    micro-batches also come from a token budget (every rank must run as many as the others)."""
    out = tmp_path / "ddp"
    # accelerate forms a 2-process CPU group (MULTI_CPU, gloo) under torchrun with ACCELERATE_USE_CPU=1
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launcher, str(RECIPE), "--output-dir", str(out), *FAST, "--max-steps", "2",
         "--rollout-micro-batch-size", "2", *extra],
        cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert len(series(rows, "reward/score_mean")) == 2  # rank 0 logs once per step
    assert all(0 < x <= 8 for x in series(rows, "response/length_mean"))
    generated = [r["dispatch/samples_generated_min"] + r["dispatch/samples_generated_max"] for r in rows if
                 "dispatch/samples_generated_min" in r]  # fmt: skip
    assert generated == (
        [8, 8] if "--dynamic-dispatch" in extra else []
    )  # every rollout prompt generated exactly once
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_runs_on_a_checkpoint_set_up_like_a_real_one(independent_runs):
    """SmolLM2-like actor (bf16 on disk, no pad token, EOS != end of turn, config pad id != tokenizer's,
    attention dropout 0.3, sampling settings in generation_config) on chat-message prompts, scored by a
    reward model from the actor's own directory (a fresh score head; its tokenizer, without a pad token,
    passes the same-tokenizer check), with padding-free passes (``--packed-passes on``; the CPU default
    keeps them padded) under gradient checkpointing: the recipe pads safely, trains in fp32 against an fp32 reference (KL exactly 0
    before the first update: no dropout, same precision) and stops responses at <|im_end|>."""
    proc, d = independent_runs["real_like"]
    check_ok(proc)
    assert "no pad token; padding with its EOS" in proc.stdout
    assert "actor float32 (trainable), critic float32 (trainable), reference float32 (frozen)" in proc.stdout
    rows = metrics(d / "out")
    kl = series(rows, "kl/seq_mean")
    assert len(kl) == 2 and abs(kl[0]) < 1e-5, kl
    assert all(abs(v) < 1e30 for r in rows for v in r.values() if isinstance(v, float))
