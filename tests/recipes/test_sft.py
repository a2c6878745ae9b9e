"""The SFT recipe through its real CLI, on a tiny causal LM and synthetic data."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_kit.data import write_comparisons, write_jsonl
from rlhf_kit.training import read_metrics
from tests.conftest import make_causal_lm
from tests.recipes.procs import check_ok, run_all, run_bad_configurations

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "recipes" / "sft.py")
WORDS = ["the", "dog", "water", "red", "blue", "happy", "apple", "no", "maybe", "sure", "cat"]
ANSWER = " okay thanks"


ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sft.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def prompt(rng: random.Random) -> str:
    return "User: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 6))) + "\n\nAssistant:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sft")
    model_dir = root / "tiny_lm"
    make_causal_lm(tokenizer, "llama", seed=0, hidden_size=32, intermediate_size=64).save_pretrained(
        model_dir
    )
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    # text records in the three accepted shapes; the response is always ANSWER
    records = []
    for i in range(160):
        p = prompt(rng)
        if i % 3 == 0:
            records.append({"text": p + ANSWER})
        elif i % 3 == 1:
            records.append({"prompt": p, "response": ANSWER})
        else:
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": p[6:-12]},
                        {"role": "assistant", "content": ANSWER[1:]},
                    ]
                }
            )
    write_jsonl(root / "train.jsonl", records)
    write_jsonl(root / "val.jsonl", [{"prompt": prompt(rng), "response": ANSWER} for _ in range(32)])
    # comparison data (chosen responses of varied length) for the resume / equivalence runs
    pairs = [
        (prompt(rng) + " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8))), prompt(rng) + " no")
        for _ in range(96)
    ]
    write_comparisons(root / "pairs.jsonl", pairs)
    common = [
        "--model",
        str(model_dir),
        "--max-length",
        "48",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--val-size",
        "16",
    ]
    return root, common


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """6 steps on comparison data, micro batch 4 x accumulation 1."""
    root, common = setup
    out = root / "full"
    run(
        *common,
        "--train-data",
        str(root / "pairs.jsonl"),
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


def equivalent_run(setup, name: str, *args: str) -> Path:
    root, common = setup
    out = root / name
    run(
        *common,
        "--train-data",
        str(root / "pairs.jsonl"),
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--global-batch-size",
        "4",
        "--val-check-interval",
        "3",
        *args,
    )
    return out


def losses(out: Path, key: str = "train/loss") -> list[float]:
    return [r[key] for r in read_metrics(out) if key in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_learns_the_response_and_writes_a_loadable_model(setup):
    root, common = setup
    out = root / "learn"
    run(
        *common,
        "--train-data",
        str(root / "train.jsonl"),
        "--val-data",
        str(root / "val.jsonl"),
        "--test-data",
        str(root / "val.jsonl"),
        "--data-format",
        "text",
        "--output-dir",
        str(out),
        "--max-steps",
        "30",
        "--micro-batch-size",
        "8",
        "--global-batch-size",
        "16",
        "--val-check-interval",
        "15",
        "--packing",
        "--lr",
        "1e-2",
    )
    results = json.loads((out / "eval_results.json").read_text())
    train = losses(out)
    assert len(train) == 30 and train[-1] < 0.2 * train[0]
    assert results["val"]["loss"] < 0.5 and results["test"]["loss"] == pytest.approx(results["val"]["loss"])
    assert [r["step"] for r in read_metrics(out) if "val/loss" in r] == [15, 30]
    steps = [r for r in read_metrics(out) if "time/step_s" in r]
    assert len(steps) == 30 and all(r["time/step_s"] > 0 for r in steps)
    assert all(
        r["throughput/tokens_per_s"] == pytest.approx(r["train/tokens"] / r["time/step_s"]) for r in steps
    )
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("User: red dog\n\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).startswith(ANSWER)


def test_resume_equals_uninterrupted(setup, uninterrupted):
    args = ["--micro-batch-size", "4", "--save-interval", "3"]
    out = equivalent_run(setup, "resumed", *args, "--stop-at-step", "3")
    assert not (out / "final").exists()
    equivalent_run(setup, "resumed", *args, "--resume")
    assert losses(out) == losses(uninterrupted)
    assert losses(out, "val/loss") == losses(uninterrupted, "val/loss")
    a, b = weights(out), weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "variant",
    [
        ["--micro-batch-size", "1", "--micro-batch-tokens", "0"],
        ["--micro-batch-size", "4", "--packing"],
        ["--micro-batch-tokens", "40"],
    ],
    ids=["micro1_accum4", "packed", "token_budget"],
)
def test_token_weighted_accumulation_and_packing_match(setup, uninterrupted, variant):
    out = equivalent_run(setup, "variant_" + "_".join(variant).replace("-", ""), *variant)
    assert losses(out) == pytest.approx(losses(uninterrupted), abs=1e-5)
    a, b = weights(out), weights(uninterrupted)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


BAD_CONFIGURATIONS = [
    (
        ["--global-batch-size", "6", "--micro-batch-size", "4", "--micro-batch-tokens", "0"],
        "global batch 6 is not divisible by micro batch 4 x world size 1 = 4",
    ),
    (["--val-data", "/nonexistent/val.jsonl"], "validation data not found: /nonexistent/val.jsonl"),
    (["--model", "/nonexistent/model"], "model path does not exist: /nonexistent/model"),
    (["--report-to", "nosuch"], "--report-to nosuch: unknown tracker; choose from jsonl, aim"),
    (["--micro-batch-tokens", "-1"], "--micro-batch-tokens must be >= 0"),
    (["--fp8-backward", "weights"], "--fp8-backward needs bf16 trained weights: --master-weights"),
    (["--fp8-backward", "all", "--master-weights", "--lora-r", "4"], "--fp8-backward converts plain linear layers"),
]


@pytest.fixture(scope="module")
def bad_configuration_runs(tmp_path_factory):
    """Every case of test_bad_configuration_stops_with_one_line, each its own CLI process, started at
    once (each is ~7 s of imports on one core): ``{args: (CompletedProcess, output dir)}``."""
    return run_bad_configurations(
        SCRIPT, BAD_CONFIGURATIONS, tmp_path_factory.mktemp("sft_bad"), env=ENV, cwd=ROOT
    )


@pytest.mark.parametrize("args, message", BAD_CONFIGURATIONS)
def test_bad_configuration_stops_with_one_line(bad_configuration_runs, args, message):
    proc, out = bad_configuration_runs[tuple(args)]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"sft.py: error: {message}"), (
        proc.stderr
    )
    assert not (out / "tiny_causal_lm").exists()


def test_bad_record_names_file_and_line(setup, tmp_path):
    root, common = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "User: hi\\n\\nAssistant: yo"}\n{"response": "no prompt"}\n')
    proc = run(
        *common,
        "--train-data",
        str(bad),
        "--data-format",
        "text",
        "--output-dir",
        str(tmp_path / "o"),
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"sft.py: error: {bad}:2: missing field 'prompt'"
    ]


def test_master_weights_resume_exactly_and_track_the_fp32_run(setup, uninterrupted):
    """--master-weights: bf16 weights saved, exact resume, and losses close to the fp32 run's; so are
    --optimizer adamw8bit's (bf16 weights, 8-bit moments). The full run, the run stopped at step 3 and
    the 8-bit run are independent: they run at once, one thread each (CI has 2 cores), and so does the
    resume (the same thread count on both sides of the exact comparison)."""
    root, common = setup
    args = [SCRIPT, *common, "--train-data", str(root / "pairs.jsonl"), "--max-steps", "6",
            "--global-batch-size", "4", "--val-check-interval", "3", "--micro-batch-size", "4",
            "--save-interval", "3", "--master-weights"]  # fmt: skip
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    full, out = root / "master_full", root / "master_resumed"
    first = run_all(
        {
            "full": [sys.executable, *args, "--output-dir", str(full)],
            "stop": [sys.executable, *args, "--output-dir", str(out), "--stop-at-step", "3"],
            "8bit": [sys.executable, *args[:-1], "--optimizer", "adamw8bit", "--output-dir", str(root / "8bit")],
        },
        env=env, cwd=ROOT,
    )  # fmt: skip
    for proc in first.values():
        check_ok(proc)
    assert not (out / "final").exists()
    resume = run_all(
        {"resume": [sys.executable, *args, "--output-dir", str(out), "--resume"]}, env=env, cwd=ROOT
    )
    check_ok(resume["resume"])
    assert losses(out) == losses(full)
    a, b = weights(out), weights(full)
    assert all(torch.equal(a[k], b[k]) for k in a) and {v.dtype for v in a.values()} == {torch.bfloat16}
    assert losses(full) == pytest.approx(losses(uninterrupted), rel=0.05)
    assert losses(full) != losses(uninterrupted)  # bf16 weights really were used
    assert losses(root / "8bit") == pytest.approx(losses(uninterrupted), rel=0.05)
    assert losses(root / "8bit") not in (losses(full), losses(uninterrupted))
    assert {v.dtype for v in weights(root / "8bit").values()} == {torch.bfloat16}


def test_final_directory_has_a_model_card(setup, uninterrupted):
    """The real CLI writes final/README.md: hub front matter, the data, the metrics and the command."""
    from huggingface_hub import ModelCard

    root, common = setup
    card = ModelCard.load(uninterrupted / "final" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["rlhf_kit", "sft"]
    assert card.data.base_model is None and card.data.datasets is None  # local model and data: body only
    results = json.loads((uninterrupted / "eval_results.json").read_text())
    assert f"| val/loss | `{results['val']['loss']:.6g}` |" in card.text
    assert "| --max-steps | `6` |" in card.text and str(root / "pairs.jsonl") in card.text
    assert "recipes/sft.py" in card.text and f"--output-dir {uninterrupted}" in card.text
    assert not list((uninterrupted / "final").glob(".*.tmp"))
