"""Reward-model recipe speed sweep on a real checkpoint: ``recipes/reward_model.py`` with each set of
speed flags for a fixed number of steps, on the same data, in one call (issue #18).

    python bench/rm_speed.py --model /tmp/real/smollm2 --data /tmp/real/work/data --out $OUT \
        --steps 30 [--only base,ckpt_tok16k]

Each variant runs in its own process (clean peak-memory counters). Throughput is the honest kind:
pairs trained / the summed wall time of *every* step (the first, which pays CUDA and compile warm-up,
included), as ``trl.RewardTrainer`` reports ``train_samples_per_second``. Peak memory is the largest
``memory/peak_allocated_gib`` any step logged. Same global batch (32), max length (1024), learning rate
schedule and data for every variant; only how a step is computed changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CKPT, LIGER = ["--gradient-checkpointing"], ["--liger-kernel"]
MASTER = ["--master-weights", "--mixed-precision", "no"]  # bf16 weights, fp32 masters, no autocast
CUDNN = ["--cudnn-attention"]  # SDPA may use cuDNN's kernel (the default was on until 2026-12-04)


def tok(n: int) -> list[str]:
    return ["--micro-batch-tokens", str(n)]


#: name -> extra flags for recipes/reward_model.py (base: fixed micro-batches of 8 pairs, bf16 autocast)
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "ckpt": CKPT,
    "tok16k": tok(16384),
    "ckpt_tok16k": CKPT + tok(16384),
    "ckpt_tok32k": CKPT + tok(32768),
    "ckpt_tok32k_master": CKPT + tok(32768) + MASTER,
    "ckpt_tok32k_master_cudnn": CKPT + tok(32768) + MASTER + CUDNN,
    "ckpt_tok16k_master": CKPT + tok(16384) + MASTER,
    "ckpt_tok16k_master_cudnn": CKPT + tok(16384) + MASTER + CUDNN,
    "tok32k_master": tok(32768) + MASTER,
    "ckpt_tok16k_liger": CKPT + tok(16384) + LIGER,
    "ckpt_tok16k_liger_master": CKPT + tok(16384) + LIGER + MASTER,
    "ckpt_tok32k_liger_master": CKPT + tok(32768) + LIGER + MASTER,
    "ckpt_tok16k_compile": CKPT + tok(16384) + ["--compile-blocks"],
    "tok32k_liger_master": tok(32768) + LIGER + MASTER,
}


def summarize(metrics_path: str, batch: int, profiled: int = 0) -> dict:
    """Throughput over the logged steps; a step run under the profiler (``profiled``) is left out."""
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "time/step_s" in r and r.get("step") != profiled]
    total = sum(r["time/step_s"] for r in train)
    steady = sum(r["time/step_s"] for r in train[3:])
    return {
        "steps": len(train),
        "pairs_per_s": batch * len(train) / total,
        "pairs_per_s_after_3": batch * len(train[3:]) / steady if steady else None,
        "peak_allocated_gib": max((r.get("memory/peak_allocated_gib", 0.0) for r in train), default=None),
        "first_step_s": train[0]["time/step_s"] if train else None,
        "loss_first_last": [train[0]["train/loss"], train[-1]["train/loss"]] if train else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument(
        "--data", required=True, help="folder with train_comparisons.jsonl, test_comparisons.jsonl"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/rm_speed")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--profile-step", type=int, default=0, help="also profile this step (--profile-steps)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    results: dict = {"command": " ".join(["python", *sys.argv]), "variants": {}}
    for name in names:
        out = os.path.join(args.work, name)
        cmd = [sys.executable, os.path.join(ROOT, "recipes/reward_model.py"), "--model", args.model,
               "--train-data", os.path.join(args.data, "train_comparisons.jsonl"),
               "--val-data", os.path.join(args.data, "test_comparisons.jsonl"), "--output-dir", out, "--overwrite",
               "--max-steps", str(args.steps), "--global-batch-size", str(args.batch), "--micro-batch-size", "8",
               "--max-length", str(args.max_length), "--lr", "1e-5", "--warmup-steps", "10", "--min-lr-ratio", "0",
               "--mixed-precision", "bf16", "--val-check-interval", "100000", "--save-interval", "100000",
               *VARIANTS[name]]  # fmt: skip
        if args.profile_step:
            cmd += ["--profile-steps", str(args.profile_step)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", ""
        res: dict = {"flags": VARIANTS[name], "rc": rc, "wall_s": time.perf_counter() - t0}
        metrics = os.path.join(out, "metrics.jsonl")
        if rc == 0 and os.path.exists(metrics):
            res |= summarize(metrics, args.batch, args.profile_step)
            res["val_accuracy"] = [
                json.loads(line)["val/accuracy"] for line in open(metrics) if "val/accuracy" in line
            ][-1:]
        else:
            res["tail"] = tail
        prof = os.path.join(out, "profile", f"step_{args.profile_step}")
        if args.profile_step and os.path.exists(prof + ".json"):  # the split of one step, beside the speed
            res["profile"] = json.load(open(prof + ".json"))
            shutil.copy(prof + ".txt", os.path.join(args.out, f"profile_{name}.txt"))
        results["variants"][name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "tail"}), flush=True)
        if rc != 0:
            print(tail, flush=True)
        with open(os.path.join(args.out, "rm_speed.json"), "w") as f:
            json.dump(results, f, indent=2)
    lines = ["| variant | pairs/s (all steps) | pairs/s (after 3) | peak GiB | first step s | flags |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results["variants"].items():
        if "pairs_per_s" in r:
            lines.append(f"| {name} | {r['pairs_per_s']:.1f} | {r['pairs_per_s_after_3'] or 0:.1f} | "
                         f"{r['peak_allocated_gib'] or 0:.2f} | {r['first_step_s']:.2f} | {' '.join(r['flags'])} |")  # fmt: skip
        else:
            lines.append(f"| {name} | failed rc={r['rc']} | | | | {' '.join(r['flags'])} |")
    table = "\n".join(lines) + "\n"
    open(os.path.join(args.out, "rm_speed.md"), "w").write(table)
    print(table)


if __name__ == "__main__":
    main()
