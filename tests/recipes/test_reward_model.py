"""The reward-model recipe through its real CLI, on a tiny model and synthetic comparisons."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhf_kit.data import write_comparisons
from rlhf_kit.training import read_metrics
from tests.conftest import make_reward_model
from tests.recipes.procs import check_ok, run_all, run_bad_configurations

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "recipes" / "reward_model.py")
WORDS = ["the", "dog", "water", "red", "blue", "happy", "apple", "okay", "no", "maybe", "sure", "cat"]
MARKERS = ["thanks", "banana", "purple", "seven", "yellow", "hello", "apple maybe"]


ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, check: bool = True, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if launcher:  # accelerate forms a 2-process CPU group (MULTI_CPU) under torchrun with this set
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = (launcher or [sys.executable]) + [SCRIPT, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def marker_pairs(n: int, seed: int, marker: str) -> list[tuple[str, str]]:
    """Chosen and rejected responses differ in one word: the marker in the chosen, another in the rejected."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = "User: " + " ".join(rng.choices(WORDS, k=3)) + "\n\nAssistant:"
        words = rng.choices(WORDS, k=rng.randint(2, 5))
        k = rng.randint(0, len(words))
        chosen = words[:k] + [marker] + words[k:]
        rejected = words[:k] + [rng.choice(WORDS)] + words[k:]
        pairs.append((prompt + " " + " ".join(chosen), prompt + " " + " ".join(rejected)))
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rm")
    model_dir = root / "tiny_rm"
    make_reward_model(tokenizer, "llama", seed=0, hidden_size=32, intermediate_size=64).save_pretrained(
        model_dir
    )
    tokenizer.save_pretrained(model_dir)
    # The marker the random-init model ranks worst, so that the rule must be learnt (not there by chance).
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    init_acc = {m: pair_accuracy(model, tokenizer, marker_pairs(64, 0, m)) for m in MARKERS}
    marker = min(init_acc, key=init_acc.get)
    assert init_acc[marker] < 0.6, init_acc
    write_comparisons(root / "train.jsonl", marker_pairs(256, 1, marker))
    write_comparisons(root / "val.jsonl", marker_pairs(64, 2, marker))
    common = [
        "--model",
        str(model_dir),
        "--train-data",
        str(root / "train.jsonl"),
        "--val-data",
        str(root / "val.jsonl"),
        "--max-length",
        "48",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
    ]
    return root, common, marker


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """6 steps of micro batch 4 x accumulation 1, validated every 3 steps."""
    root, common, marker = setup
    out = root / "full"
    run(
        *common,
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "4",
        "--val-check-interval",
        "3",
        "--save-interval",
        "3",
    )
    return out


@torch.no_grad()
def pair_accuracy(model, tokenizer, pairs) -> float:
    chosen, rejected = zip(*pairs)
    enc = tokenizer(list(chosen) + list(rejected), return_tensors="pt", padding=True)
    scores = model(**enc).logits[:, 0]
    return (scores[: len(chosen)] > scores[len(chosen) :]).float().mean().item()


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def train_losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]


def test_learns_marker_rule_and_writes_a_loadable_model(setup):
    root, common, marker = setup
    out = root / "learn"
    run(
        *common,
        "--output-dir",
        str(out),
        "--max-steps",
        "40",
        "--micro-batch-size",
        "8",
        "--global-batch-size",
        "16",
        "--val-check-interval",
        "20",
        "--save-interval",
        "20",
        "--test-data",
        str(root / "val.jsonl"),
        "--report-to",
        "jsonl",
        "tensorboard",
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["val"]["accuracy"] > 0.95 and results["test"]["accuracy"] > 0.95
    rows = read_metrics(out)
    assert rows[0]["train/accuracy"] < 0.7  # the rule is learnt, not there from the start
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 41))
    val_rows = [r for r in rows if "val/accuracy" in r]
    assert [r["step"] for r in val_rows] == [20, 40]
    assert {"val/loss", "val/chosen_reward", "val/rejected_reward"} <= set(val_rows[0])
    assert any("test/accuracy" in r for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))  # accelerate's TensorBoardTracker, same scalars
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    jsonl_loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in tb_loss] == list(range(1, 41))
    assert [v for _, v in tb_loss] == pytest.approx([v for _, v in jsonl_loss], rel=1e-6)
    assert [e.step for e in events.Scalars("val/accuracy")] == [20, 40]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_20", "step_40"]

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["mean"] == pytest.approx(results["val"]["reward_mean"])
    assert model.config.reward_mean == pytest.approx(stats["mean"]) and model.config.reward_std > 0
    # the loaded model ranks fresh pairs by the rule
    from transformers import AutoTokenizer

    assert (
        pair_accuracy(model, AutoTokenizer.from_pretrained(out / "final"), marker_pairs(32, 3, marker)) > 0.9
    )


def test_resume_equals_uninterrupted(setup, uninterrupted):
    root, common, marker = setup
    out = root / "resumed"
    args = [
        *common,
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "4",
        "--val-check-interval",
        "3",
        "--save-interval",
        "3",
    ]
    first = run(*args, "--stop-at-step", "3")
    assert "stopped at step 3" in first.stdout and not (out / "final").exists()
    run(*args, "--resume")
    # Two CPU processes fed the same bytes can differ in the last float32 bit (a CI run saw 6e-8 on the
    # step-1 loss of two fresh runs). A broken resume (data position, optimizer or schedule state) moves
    # losses by >1e-3 and weights by ~lr=3e-3 per step, three orders above these tolerances.
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted), rel=1e-5, abs=1e-7)
    a, b = final_weights(out), final_weights(uninterrupted)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    val = [r["val/accuracy"] for r in read_metrics(out) if "val/accuracy" in r]
    assert val == [r["val/accuracy"] for r in read_metrics(uninterrupted) if "val/accuracy" in r]


def test_micro_batch_times_accumulation_is_equivalent(setup, uninterrupted):
    root, common, marker = setup
    out = root / "micro1"
    run(
        *common,
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--micro-batch-tokens",
        "0",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "4",
        "--val-check-interval",
        "3",
        "--save-interval",
        "100",
    )
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted), abs=1e-5)
    a, b = final_weights(out), final_weights(uninterrupted)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_token_budget_micro_batches_are_equivalent(setup, uninterrupted):
    """--micro-batch-tokens 100 cuts each step's 4 pairs (sides up to 48 tokens) into micro-batches of 1
    to 2 pairs by length, each weighted by its pairs: the same steps as one micro-batch of 4. Step 2 runs
    under the profiler (--profile-steps), which must change nothing but write its files. The run scores
    padding-free (--packed-passes on; the CPU default is padded), under the recipe's default gradient
    checkpointing, and must still equal the padded run."""
    root, common, marker = setup
    out = root / "budget"
    run(*common, "--output-dir", str(out), "--max-steps", "6", "--micro-batch-tokens", "100",
        "--global-batch-size", "4", "--val-check-interval", "3", "--save-interval", "100",
        "--profile-steps", "2", "--packed-passes", "on")  # fmt: skip
    assert sorted(p.name for p in (out / "profile").iterdir()) == [
        "step_2.json",
        "step_2.trace.json",
        "step_2.txt",
    ]
    summary = json.loads((out / "profile" / "step_2.json").read_text())
    assert summary["wall_s"] > 0 and any(op["op"] == "aten::mm" for op in summary["top"])
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted), abs=1e-5)
    a, b = final_weights(out), final_weights(uninterrupted)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_two_processes_match_one(setup, uninterrupted):
    """2 CPU processes (accelerate MULTI_CPU, DDP over gloo), micro 2 each: same as 1 process x micro 4.

    ``accelerate launch --cpu --num_processes 2`` starts a single process on this accelerate version, so
    the test launches with torchrun and ``ACCELERATE_USE_CPU=1``, which gives a real 2-rank group."""
    root, common, marker = setup
    out = root / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run(
        *common,
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--val-check-interval",
        "3",
        "--save-interval",
        "100",
        launcher=launcher,
    )
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted), abs=1e-5)
    val = [r["val/accuracy"] for r in read_metrics(out) if "val/accuracy" in r]
    assert val == pytest.approx(
        [r["val/accuracy"] for r in read_metrics(uninterrupted) if "val/accuracy" in r]
    )
    a, b = final_weights(out), final_weights(uninterrupted)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


BAD_CONFIGURATIONS = [
    (
        ["--global-batch-size", "10", "--micro-batch-size", "4", "--micro-batch-tokens", "0"],
        "global batch 10 is not divisible by micro batch 4 x world size 1 = 4",
    ),
    (["--train-data", "/nonexistent/train.jsonl"], "training data not found: /nonexistent/train.jsonl"),
    (["--model", "/nonexistent/model"], "model path does not exist: /nonexistent/model"),
    (["--liger-kernel"], "--liger-kernel needs liger-kernel (and Triton): pip install 'rlhf-kit[liger]'"),
    (["--micro-batch-tokens", "-1"], "--micro-batch-tokens must be >= 0"),
    (["--report-to", "nosuch"], "--report-to nosuch: unknown tracker; choose from jsonl, aim"),
    (["--optimizer", "adamw8bit", "--lora-r", "4"], "--optimizer adamw8bit trains all weights"),
    (["--fp8-backward", "weights"], "--fp8-backward needs bf16 trained weights: --master-weights"),
]


@pytest.fixture(scope="module")
def bad_configuration_runs(tmp_path_factory):
    """Every case of test_bad_configuration_stops_with_one_line, each its own CLI process, started at
    once (each is ~7 s of imports on one core): ``{args: (CompletedProcess, output dir)}``."""
    return run_bad_configurations(
        SCRIPT, BAD_CONFIGURATIONS, tmp_path_factory.mktemp("rm_bad"), env=ENV, cwd=ROOT
    )


@pytest.mark.parametrize("args, message", BAD_CONFIGURATIONS)
def test_bad_configuration_stops_with_one_line(bad_configuration_runs, args, message):
    proc, out = bad_configuration_runs[tuple(args)]
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"reward_model.py: error: {message}"), proc.stderr
    assert not (out / "tiny_reward").exists()  # stopped before any model was built or loaded


def test_existing_run_needs_resume(setup, uninterrupted):
    proc = run("--output-dir", str(uninterrupted), check=False)
    assert (
        proc.returncode == 2 and "pass --resume" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    )


def test_master_weights_resume_exactly_and_save_bf16(setup):
    """--master-weights: bf16 weights, fp32 masters in the optimizer state; a stop at step 3 and a resume
    end with the uninterrupted run's weights and losses (the masters travel in the checkpoint). The
    uninterrupted run and the run stopped at step 3 are independent: they run at once, one thread each
    (CI has 2 cores), and so does the resume (the same thread count on both sides of the comparison)."""
    root, common, _ = setup
    args = [SCRIPT, *common, "--max-steps", "6", "--micro-batch-size", "4", "--global-batch-size", "4",
            "--val-check-interval", "3", "--save-interval", "3", "--master-weights"]  # fmt: skip
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    full, resumed = root / "master_full", root / "master_resumed"
    first = run_all(
        {
            "full": [sys.executable, *args, "--output-dir", str(full)],
            "stop": [sys.executable, *args, "--output-dir", str(resumed), "--stop-at-step", "3"],
        },
        env=env, cwd=ROOT,
    )  # fmt: skip
    check_ok(first["full"]), check_ok(first["stop"])
    assert "stopped at step 3" in first["stop"].stdout and not (resumed / "final").exists()
    check_ok(run_all({"resume": [sys.executable, *args, "--output-dir", str(resumed), "--resume"]},
                     env=env, cwd=ROOT)["resume"])  # fmt: skip
    assert train_losses(resumed) == train_losses(full) and len(train_losses(full)) == 6
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.bfloat16}


def test_fp8_backward_keeps_the_forward_and_changes_the_gradients(setup):
    """--fp8-backward all next to the same --master-weights run, at once: the first step's loss (before
    any update) is the same to the bit, the later ones are not (FP8 gradients took other steps), and the
    saved model is a plain bf16 one."""
    root, common, _ = setup
    args = [SCRIPT, *common, "--max-steps", "3", "--micro-batch-size", "4", "--global-batch-size", "4",
            "--val-check-interval", "3", "--master-weights"]  # fmt: skip
    outs = {"bf16": root / "fp8_off", "fp8": root / "fp8_all"}
    procs = run_all(
        {"bf16": [sys.executable, *args, "--output-dir", str(outs["bf16"])],
         "fp8": [sys.executable, *args, "--output-dir", str(outs["fp8"]), "--fp8-backward", "all"]},
        env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )  # fmt: skip
    check_ok(procs["bf16"]), check_ok(procs["fp8"])
    bf16, fp8 = train_losses(outs["bf16"]), train_losses(outs["fp8"])
    assert len(fp8) == 3 and fp8[0] == bf16[0] and fp8[1:] != bf16[1:], (bf16, fp8)
    weights = final_weights(outs["fp8"])
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert set(weights) == set(final_weights(outs["bf16"]))


def test_learns_on_a_checkpoint_set_up_like_a_real_one(tmp_path):
    """SmolLM2-like (transformers 5.17's view of it): bf16 on disk, no pad token, EOS <|im_start|> while
    turns end with <|im_end|>, config pad id 0, attention dropout 0.3, a ChatML template; chat-message
    data. The recipe pads safely, trains in fp32 and learns the rule. (pad == EOS and differing pad ids
    are covered at the unit level: tests/unit/models/test_real_checkpoints.py.)"""
    pad = "none"
    from rlhf_kit.data.formats import write_jsonl
    from rlhf_kit.tiny import save_real_like_checkpoint

    model_dir = save_real_like_checkpoint(str(tmp_path / "m"), pad=pad, hidden_size=32, intermediate_size=64)

    def chat(n, seed):
        return [
            {"prompt": [{"role": "user", "content": c.split("\n\nAssistant:")[0][6:]}],
             "chosen": c.split("Assistant: ")[1], "rejected": r.split("Assistant: ")[1]}
            for c, r in marker_pairs(n, seed, "banana")
        ]  # fmt: skip

    write_jsonl(tmp_path / "train.jsonl", chat(256, 1))
    write_jsonl(tmp_path / "val.jsonl", chat(64, 2))
    out = tmp_path / "out"
    proc = run(
        "--model", model_dir, "--train-data", str(tmp_path / "train.jsonl"), "--val-data",
        str(tmp_path / "val.jsonl"), "--max-length", "96", "--lr", "3e-3", "--warmup-steps", "2",
        "--output-dir", str(out), "--max-steps", "40", "--micro-batch-size", "8", "--global-batch-size", "16",
        "--val-check-interval", "100",
    )  # fmt: skip
    assert "no pad token; padding with its EOS" in proc.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert results["val"]["accuracy"] > 0.9, results
    saved = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert saved.dtype == torch.float32  # trained (and saved) in fp32, not the checkpoint's bf16
