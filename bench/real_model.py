"""A real pretrained checkpoint end to end: reward model against TRL, then PPO on our reward model.

    python bench/real_model.py --model /tmp/smollm2 --out $OUT              # GPU (docs/benchmarks.md)
    python bench/real_model.py --model DIR --out /tmp/rm_cpu --small        # CPU smoke run (minutes)

Stages (each a subprocess, so peak memory is per stage):

1. Data: the shipped HH sample as chat messages (``download_and_process.py --source default --format
   messages``: 2,069 train / 230 test pairs), rendered with the model's chat template.
2. ``rm_ours``: ``recipes/reward_model.py`` on the checkpoint (lr 1e-5, cosine to 0 with 10 warm-up
   steps, global batch 32 = 8 x 4, 2 epochs, max length 1024; otherwise the recipe's defaults, which on
   one GPU are bf16 weights with fp32 masters and gradient checkpointing; validation = the test split).
3. ``rm_trl``: ``trl.RewardTrainer`` (the release installed) with the same hyper-parameters on the *same
   token ids* (our tokenisation of the same files, passed as ``chosen_ids``/``rejected_ids``), fp32 weights
   under bf16 autocast; test accuracy and loss from ``trainer.evaluate`` on the test pairs.
4. ``ppo``: ``recipes/ppo.py`` from the instruct model with our reward model (critic initialised from it),
   64 prompts x 128 new tokens a step, validation on 64 held-out prompts every 10 steps.
5. ``eval``: ``recipes/evaluate.py``: RM-judged win rate of the PPO policy over the initial one (greedy).

Writes ``real_model.json`` (every number), ``real_model.md`` (the tables) and ``real_model.png`` (loss
curves side by side; PPO reward and KL) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)


def run(cmd: list[str], log: str, env: dict | None = None) -> float:
    """Run a stage, tee its output to ``log``; returns wall seconds. Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = open(log).read()[-3000:]
        raise SystemExit(f"stage failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall


def rows(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trl_worker(args: argparse.Namespace) -> None:
    """Train and evaluate ``trl.RewardTrainer`` on our token ids; writes ``<out>/rm_trl.json``."""
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_kit.data import load_comparisons, tokenize_pairs
    from rlhf_kit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model, padding_side="right")

    def data(path: str) -> Dataset:
        ex, _ = tokenize_pairs(load_comparisons(path), tok, args.max_length, "drop")
        return Dataset.from_dict(
            {
                "chosen_ids": [e["chosen_input_ids"] for e in ex],
                "rejected_ids": [e["rejected_input_ids"] for e in ex],
            }
        )

    train, test = data(args.train), data(args.test)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    cuda = torch.cuda.is_available()
    cfg = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_rm_"),
        per_device_train_batch_size=args.micro,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=args.batch // args.micro,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    ev = trainer.evaluate(test)
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    res = {
        "trl_version": trl.__version__,
        "test_accuracy": ev.get("eval_accuracy"),
        "test_loss": ev.get("eval_loss"),
        "train_pairs": len(train),
        "test_pairs": len(test),
        "train_wall_s": wall,
        "pairs_per_s": out.metrics.get("train_samples_per_second"),
        "peak_allocated_gib": peak,
        "loss_curve": curve,
    }
    with open(os.path.join(args.out, "rm_trl.json"), "w") as f:
        json.dump(res, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF causal-LM directory (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="scratch folder (default <out>/work)")
    ap.add_argument("--stages", default="data,rm_ours,rm_trl,ppo,eval")
    ap.add_argument("--small", action="store_true", help="CPU smoke run: few steps, short sequences")
    ap.add_argument("--ppo-steps", type=int, default=40)
    ap.add_argument("--ppo-args", default="", help="extra flags for recipes/ppo.py")
    ap.add_argument(
        "--rm-args", default="", help="extra flags for recipes/reward_model.py (e.g. speed flags)"
    )
    ap.add_argument("--worker", choices=["trl"], default=None)
    for name, default in (("train", ""), ("test", "")):
        ap.add_argument(f"--{name}", default=default)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()
    if args.worker == "trl":
        return trl_worker(args)

    os.makedirs(args.out, exist_ok=True)
    work = args.work or os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    stages = args.stages.split(",")
    py = sys.executable
    data = os.path.join(work, "data")
    train, test = os.path.join(data, "train_comparisons.jsonl"), os.path.join(data, "test_comparisons.jsonl")
    if args.small:
        args.max_length, args.batch, args.micro, args.max_steps, args.ppo_steps = 256, 8, 4, 4, 2
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    res_path = os.path.join(work, "real_model.json")  # kept in --work, so later calls add to it
    results: dict[str, Any] = json.load(open(res_path)) if os.path.exists(res_path) else {}
    results["command"] = " ".join([os.path.basename(py), *sys.argv])

    def save() -> None:
        with open(res_path, "w") as f:
            json.dump(results, f, indent=2)

    if "data" in stages:
        run([py, "recipes/download_and_process.py", "--source", "default", "--format", "messages",
             "--output-dir", data], os.path.join(logs, "data.log"))  # fmt: skip
    rm_dir = os.path.join(work, "rm_ours")
    if "rm_ours" in stages:
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
        wall = run([py, "recipes/reward_model.py", "--model", args.model, "--train-data", train, "--val-data", test,
                    "--test-data", test, "--output-dir", rm_dir, "--lr", str(args.lr), "--min-lr-ratio", "0",
                    "--warmup-steps", "10", "--global-batch-size", str(args.batch), "--micro-batch-size",
                    str(args.micro), "--max-length", str(args.max_length), "--val-check-interval", "20",
                    "--save-interval", "100000", *(["--mixed-precision", "no"] if args.small else []),
                    *steps, *args.rm_args.split()], os.path.join(logs, "rm_ours.log"))  # fmt: skip
        m = rows(os.path.join(rm_dir, "metrics.jsonl"))
        train_rows = [r for r in m if "train/loss" in r]
        test_row = [r for r in m if "test/accuracy" in r][-1]
        results["rm_ours"] = {
            "test_accuracy": test_row["test/accuracy"],
            "test_loss": test_row["test/loss"],
            "wall_s": wall,
            # pairs over the summed time of every step (warm-up included), as TRL's train_samples_per_second
            "pairs_per_s": args.batch * len(train_rows) / sum(r["time/step_s"] for r in train_rows),
            "rm_args": args.rm_args,
            "peak_allocated_gib": max(
                (r.get("memory/peak_allocated_gib", 0) for r in train_rows), default=None
            ),
            "loss_curve": [(r["step"], r["train/loss"]) for r in train_rows],
        }
        save()
    if "rm_trl" in stages:
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
        run([py, os.path.abspath(__file__), "--worker", "trl", "--model", args.model, "--out", work, "--train",
             train, "--test", test, "--max-length", str(args.max_length), "--micro", str(args.micro), "--batch",
             str(args.batch), "--lr", str(args.lr), *steps], os.path.join(logs, "rm_trl.log"),
            env={"TRL_EXPERIMENTAL_SILENCE": "1"})  # fmt: skip
        results["rm_trl"] = json.load(open(os.path.join(work, "rm_trl.json")))
        save()
    ppo_dir = os.path.join(work, "ppo")
    if "ppo" in stages:
        size = ["--num-rollout-samples", "64", "--rollout-micro-batch-size", "64", "--global-batch-size", "16",
                "--micro-batch-size", "16", "--max-new-tokens", "128", "--num-val-samples", "64",
                "--val-check-interval", "10", "--save-interval", "100000"]  # fmt: skip
        if args.small:
            size = ["--num-rollout-samples", "4", "--rollout-micro-batch-size", "4", "--global-batch-size", "4",
                    "--micro-batch-size", "2", "--max-new-tokens", "16", "--num-val-samples", "4",
                    "--val-check-interval", "1", "--save-interval", "100000"]  # fmt: skip
        wall = run([py, "recipes/ppo.py", "--actor", args.model, "--reward-model", os.path.join(rm_dir, "final"),
                    "--train-prompts", os.path.join(data, "train_prompts.jsonl"), "--val-prompts",
                    os.path.join(data, "test_prompts.jsonl"), "--output-dir", ppo_dir, "--max-steps",
                    str(args.ppo_steps), *size, *args.ppo_args.split()], os.path.join(logs, "ppo.log"))  # fmt: skip
        m = rows(os.path.join(ppo_dir, "metrics.jsonl"))
        results["ppo"] = {
            "wall_s": wall,
            "flags": " ".join(size + args.ppo_args.split()),
            "val": [
                {k: r[k] for k in r if k.startswith("val/") or k == "step"}
                for r in m
                if "val/kl/seq_mean" in r
            ],
            "train": [
                {
                    k: r.get(k)
                    for k in (
                        "step",
                        "reward/raw_score_mean",
                        "kl/seq_mean",
                        "response/length_mean",
                        "time/generate",
                        "time/score",
                        "time/train",
                        "policy/loss",
                        "value/loss",
                        "memory/peak_allocated_gib",
                    )
                }
                for r in m
                if "kl/seq_mean" in r
            ],  # fmt: skip
        }
        save()
    if "eval" in stages:
        n = "8" if args.small else "230"
        run([py, "recipes/evaluate.py", "--policy", os.path.join(ppo_dir, "final"), "--baseline", args.model,
             "--reward-model", os.path.join(rm_dir, "final"), "--prompts", os.path.join(data, "test_prompts.jsonl"),
             "--num-prompts", n, "--max-new-tokens", "16" if args.small else "128", "--output-dir",
             os.path.join(work, "eval")], os.path.join(logs, "eval.log"))  # fmt: skip
        results["eval"] = json.load(open(os.path.join(work, "eval", "eval.json")))["summary"]
        save()
    save()
    with open(os.path.join(args.out, "real_model.json"), "w") as f:
        json.dump(results, f, indent=2)
    report(results, args.out)


def report(results: dict[str, Any], out: str) -> None:
    """``real_model.md`` (tables) and ``real_model.png`` (curves) from the collected results."""
    lines = ["| system | test accuracy | test loss | pairs/s | peak GiB |", "|---|---|---|---|---|"]
    for name in ("rm_trl", "rm_ours"):
        r = results.get(name)
        if r:
            lines.append(
                f"| {name} | {r['test_accuracy']:.3f} | {r['test_loss']:.4f} | {r['pairs_per_s'] or 0:.1f} | "
                f"{r['peak_allocated_gib'] or 0:.2f} |"
            )
    if "ppo" in results:
        lines += ["", "| step | val raw RM score | val KL | val response length |", "|---|---|---|---|"]
        for v in results["ppo"]["val"]:
            lines.append(
                f"| {v.get('step')} | {v.get('val/reward/raw_score_mean', float('nan')):.3f} | "
                f"{v.get('val/kl/seq_mean', float('nan')):.4f} | {v.get('val/response/length_mean', float('nan')):.1f} |"
            )
    if "eval" in results:
        lines += ["", "eval: " + json.dumps(results["eval"])]
    with open(os.path.join(out, "real_model.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("rm_trl", "rm_ours"):
        if name in results:
            xs, ys = zip(*[(s, v) for s, v in results[name]["loss_curve"] if s is not None])
            ax[0].plot(xs, ys, label=f"{name} (test acc {results[name]['test_accuracy']:.3f})", alpha=0.8)
    ax[0].set(title="reward model: train loss", xlabel="optimizer step")
    ax[0].legend()
    if "ppo" in results:
        tr = results["ppo"]["train"]
        ax[1].plot([r["step"] for r in tr], [r["reward/raw_score_mean"] for r in tr], label="train")
        ax[1].plot(
            [v["step"] for v in results["ppo"]["val"]],
            [v["val/reward/raw_score_mean"] for v in results["ppo"]["val"]],
            "o-",
            label="val",
        )
        ax[1].set(title="PPO: raw RM score", xlabel="step")
        ax[1].legend()
        ax[2].plot([r["step"] for r in tr], [r["kl/seq_mean"] for r in tr])
        ax[2].set(title="PPO: KL to reference (per sequence)", xlabel="step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "real_model.png"), dpi=80)


if __name__ == "__main__":
    main()
