"""Reward-model training throughput (pairs/s) and peak GPU memory: rlhf_kit against TRL's RewardTrainer.

GPU (the numbers in docs/benchmarks.md; the current TRL installed under /tmp/site)::

    PYTHONPATH=/tmp/site:$PWD python bench/rm_vs_trl.py --out $OUT

CPU dry run (tiny model, 2 steps)::

    python bench/rm_vs_trl.py --tiny --out /tmp/bench_rm [--systems ours_grouped]

Workload (identical for every system): the shipped HH pairs tokenised once with the bench 8k BPE (EOS
appended, pairs with a side over 1,024 tokens dropped), bench config A's architecture with one label
(``AutoModelForSequenceClassification``, random init, seed 0), global batch 64 pairs, AdamW, fp32
weights under bf16 autocast (TRL: ``bf16=True``). ``--warmup`` steps, then ``--steps`` timed optimizer
steps (default 2 + 36: the timed steps cover about one epoch of the 2,298 pairs, so every system sees the
same length distribution). pairs/s = timed pairs / timed seconds (synchronised wall clock).

Systems:
* ``trl``: ``trl.RewardTrainer``, per-device batch 16 x 4 accumulation, padded batches in random order,
  ``gradient_checkpointing=False`` (the faster setting; ``trl_default`` keeps TRL's default ``True``).
* ``ours_grouped``: ``LengthGroupedSampler`` global batches; inside each, pairs sorted by length and cut
  into micro-batches under a padded-token budget (``--token-budget``), padded with ``PairCollator``,
  scored with :func:`rlhf_kit.training.evaluation.pair_scores`, ``PairwiseRewardLoss``; with
  ``--packed-passes auto`` (the default, as in the recipe) each micro-batch's rows run end to end under
  variable-length flash attention on CUDA (:mod:`rlhf_kit.models.varlen`).
* ``ours_packed``: the same batches, padding-free rows (``PackedPairCollator`` +
  ``packed_sequence_scores``) under the same token budget (SDPA with the block-diagonal mask that
  transformers derives from the restarting ``position_ids``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    build_tokenizer,
    env_for_trl,
    environment,
    fmt,
    hh_pair_examples,
    llama_config,
    median_after_warmup,
    memory_stats,
    reset_peak_memory,
    run_worker,
    sync,
    write_json,
    write_text,
)

SCRIPT = os.path.abspath(__file__)


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")


def _model(config: str, tok: Any, device: torch.device) -> Any:
    from transformers import AutoModelForSequenceClassification

    with torch.device(device):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(
            llama_config(config, tok, 1), dtype=torch.float32
        )


def micro_batches(examples: list[dict], idx: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Cut one global batch into micro-batches of similar length under a token budget.

    Pairs are sorted longest first; a micro-batch grows while its cost stays within ``budget``: padded
    cost ``2 * pairs * longest side`` (padded) or the real token count (``packed``). A pair larger than
    the budget still gets a micro-batch of its own.
    """

    def side(i: int) -> int:
        e = examples[i]
        return max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))

    def real(i: int) -> int:
        e = examples[i]
        return len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])

    order = sorted(idx, key=side, reverse=True)
    out: list[list[int]] = []
    cur: list[int] = []
    cost = 0
    for i in order:
        new_cost = cost + real(i) if packed else 2 * (len(cur) + 1) * side(cur[0] if cur else i)
        if cur and new_cost > budget:
            out.append(cur)
            cur, new_cost = [], (real(i) if packed else 2 * side(i))
        cur.append(i)
        cost = new_cost
    if cur:
        out.append(cur)
    return out


# ----------------------------------------------------------------------------------------------------
# ours


def run_ours(args: argparse.Namespace, examples: list[dict], packed: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rlhf_kit.data import LengthGroupedSampler, PackedPairCollator, PairCollator
    from rlhf_kit.data.sampling import pair_lengths
    from rlhf_kit.losses import PairwiseRewardLoss
    from rlhf_kit.models import disable_dropout, packed_sequence_scores
    from rlhf_kit.models.compile import compile_blocks
    from rlhf_kit.training.evaluation import pair_scores
    from rlhf_kit.training.metrics import compile_stats
    from rlhf_kit.training.optim import build_optimizer, clip_grad_norm
    from rlhf_kit.training.precision import build_master_weight_optimizer, grad_holder

    device = _device(args)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = disable_dropout(_model(args.config, tok, device)).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile_blocks:
        compile_blocks(model)
    if args.master_weights:  # bf16 weights, fp32 masters in AdamW (rlhf_kit.training.precision)
        opt = build_master_weight_optimizer(model, args.lr, 0.0)
    else:
        opt = build_optimizer(model, args.lr, 0.0)
    loss_fn = PairwiseRewardLoss()
    pad_collate, pack_collate = PairCollator(tok.pad_token_id), PackedPairCollator()
    sampler = LengthGroupedSampler(pair_lengths(examples), batch_size=args.batch, seed=0)
    bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not args.master_weights)

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for b in sampler.batches():
                if len(b) == args.batch:  # full global batches only (as TRL with a fixed batch size)
                    yield b
            epoch += 1

    stream = batches()
    steps: list[dict[str, Any]] = []
    reset_peak_memory(device)
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        idx = next(stream)
        micros = micro_batches(examples, idx, args.token_budget, packed)
        real = padded = 0
        for mb in micros:
            exs = [examples[i] for i in mb]
            with autocast:
                if packed:
                    batch = {k: v.to(device, non_blocking=True) for k, v in pack_collate(exs).items()}
                    scores = packed_sequence_scores(model, batch).float()
                    chosen, rejected = scores[: len(mb)], scores[len(mb) :]
                    padded += batch["input_ids"].numel()
                else:
                    batch = {k: v.to(device, non_blocking=True) for k, v in pad_collate(exs).items()}
                    chosen, rejected = pair_scores(model, batch, args.packed_passes)
                    padded += batch["input_ids"].numel()
                loss, _ = loss_fn(chosen, rejected)
            (loss * (len(mb) / len(idx))).backward()
            real += sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in exs)
        clip_grad_norm(grad_holder(model, opt), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        steps.append({"step_s": time.perf_counter() - t0, "pairs": len(idx), "real_tokens": real,
                      "padded_tokens": padded, "micro_batches": len(micros), "loss": float(loss.detach()),
                      "compiled_frames": compile_stats().get("compile/frames", 0.0)})  # fmt: skip
        if step < 3 or step % 10 == 0:
            print(f"[{'packed' if packed else 'grouped'}] step {step}: {steps[-1]}", flush=True)
    res = summarize(steps, args.warmup)
    res.update(memory_stats(device))
    res["token_budget"] = args.token_budget
    res.update(gradient_checkpointing=args.gradient_checkpointing, compile_blocks=args.compile_blocks,
               master_weights=args.master_weights, packed_passes=None if packed else args.packed_passes)  # fmt: skip
    return res


def summarize(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    timed = steps[warmup:]
    secs = sum(s["step_s"] for s in timed)
    pairs = sum(s["pairs"] for s in timed)
    real = sum(s.get("real_tokens", 0) for s in timed)
    out = {
        "step_times_s": [s["step_s"] for s in steps],
        "timed_steps": len(timed),
        "timed_s": secs,
        "pairs_per_s": pairs / secs if secs else float("nan"),
        "real_tokens_per_s": real / secs if secs else float("nan"),
        "steps": steps,
    }
    if timed:
        out["median_step_s"] = median_after_warmup([s["step_s"] for s in steps], warmup)
    if timed and "compiled_frames" in timed[0]:  # a compilation inside the timed steps: not steady state
        before = steps[warmup - 1]["compiled_frames"] if warmup else 0.0
        out["frames_compiled_in_timed_steps"] = timed[-1]["compiled_frames"] - before
    if timed and "padded_tokens" in timed[0]:
        out["padding_fraction"] = 1 - real / max(sum(s["padded_tokens"] for s in timed), 1)
    return out


# ----------------------------------------------------------------------------------------------------
# TRL


def run_trl(args: argparse.Namespace, examples: list[dict], gradient_checkpointing: bool) -> dict[str, Any]:
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16" if not args.tiny else "no")
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    device = _device(args)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.padding_side = "right"
    model = _model(args.config, tok, device)
    data = Dataset.from_dict(
        {
            "chosen_ids": [e["chosen_input_ids"] for e in examples],
            "rejected_ids": [e["rejected_input_ids"] for e in examples],
        }
    )

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.tokens: list[int] = []
            self.trainer: Any = None

        def _mark(self) -> None:
            sync(device)
            self.marks.append(time.perf_counter())
            self.tokens.append(int(getattr(self.trainer, "_total_train_tokens", 0) or 0))

        def on_train_begin(self, *a, **k):
            self._mark()

        def on_step_end(self, *a, **k):
            self._mark()

    timer = StepTimes()
    micro = args.trl_micro
    cfg = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_rm_"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch // micro,
        max_steps=args.warmup + args.steps,
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        gradient_checkpointing=gradient_checkpointing,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = RewardTrainer(
        model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer]
    )
    timer.trainer = trainer
    reset_peak_memory(device)
    trainer.train()
    mem = memory_stats(device)
    steps = [
        {"step_s": b - a, "pairs": args.batch, "real_tokens": tb - ta}
        for a, b, ta, tb in zip(timer.marks, timer.marks[1:], timer.tokens, timer.tokens[1:])
    ]
    res = summarize(steps, args.warmup)
    res.update(mem)
    res["trl_version"] = trl.__version__
    res["gradient_checkpointing"] = gradient_checkpointing
    res["per_device_batch"] = micro
    return res


# ----------------------------------------------------------------------------------------------------
# orchestration

SYSTEMS = ("trl", "trl_default", "ours_grouped", "ours_packed")


def worker_main(args: argparse.Namespace) -> None:
    with open(args.pairs) as f:
        examples = json.load(f)
    if args.worker.startswith("trl"):
        res = run_trl(args, examples, gradient_checkpointing=args.worker == "trl_default")
    else:
        res = run_ours(args, examples, packed=args.worker == "ours_packed")
    res["system"] = args.worker
    res["env"] = environment()
    write_json(args.result, res)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| system | pairs/s | real tokens/s | peak alloc GiB | padding | timed steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["systems"].items():
        if "pairs_per_s" not in r:
            lines.append(f"| {name} | failed: {r.get('error', '?')} | | | | |")
            continue
        pad = fmt(100 * r["padding_fraction"], ".0f") + "%" if "padding_fraction" in r else "n/a"
        lines.append(
            f"| {name} | {fmt(r['pairs_per_s'], '.1f')} | {fmt(r['real_tokens_per_s'], '.0f')} | "
            f"{fmt(r['peak_allocated_gib'])} | {pad} | {r['timed_steps']} |"
        )
    for k, v in results.get("ratios", {}).items():
        lines.append(f"| {k} | **{v['speedup']:.2f}x pairs/s** | | **{v['memory_ratio']:.2f}x memory** | | |")
    return "\n".join(lines) + "\n"


def apply_tiny(args: argparse.Namespace) -> argparse.Namespace:
    """``--tiny``: tiny model, batch 8, max length 256, 1 + 1 steps (CPU dry run)."""
    if args.tiny:
        args.config, args.batch, args.trl_micro, args.warmup, args.steps = "tiny", 8, 4, 1, 1
        args.max_length, args.token_budget = 256, 2048
    return args


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the orchestrator and of its workers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model, batch 8, 2 steps")
    ap.add_argument("--config", default="A")
    ap.add_argument("--batch", type=int, default=64, help="global batch (pairs)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=36, help="timed optimizer steps")
    ap.add_argument("--token-budget", type=int, default=16384, help="ours: tokens per micro-batch")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="ours: recompute activations")
    ap.add_argument("--compile-blocks", action="store_true", help="ours: torch.compile each block")
    ap.add_argument("--master-weights", action="store_true", help="ours: bf16 weights, fp32 AdamW masters")
    ap.add_argument("--packed-passes", default="auto", choices=["auto", "on", "off"],
                    help="ours_grouped: each micro-batch's rows end to end under varlen attention (the recipe default auto)")  # fmt: skip
    ap.add_argument("--trl-micro", type=int, default=16, help="TRL per-device batch (pairs)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per worker")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--work", default=None)
    # worker-only
    ap.add_argument("--worker", choices=SYSTEMS, default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--pairs", default=None)
    ap.add_argument("--result", default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = apply_tiny(build_parser().parse_args(argv))
    if args.worker:
        worker_main(args)
        return {}

    work = args.work or os.path.join("/tmp", "bench_rm_work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tok_dir = os.path.join(work, "tokenizer_tiny" if args.tiny else "tokenizer_8k")
    tok = build_tokenizer(tok_dir, args.tiny)
    examples = hh_pair_examples(tok, args.max_length)
    if args.tiny:
        examples = examples[:64]
    pairs_path = os.path.join(work, f"pairs_{args.max_length}.json")
    write_json(pairs_path, examples)
    print(f"tokenizer ({len(tok)}) and {len(examples)} pairs in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/rm_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": args.config,
        "pairs": len(examples),
        "batch": args.batch,
        "max_length": args.max_length,
        "systems": {},
    }
    passthrough = ["--config", args.config, "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--token-budget",
                   str(args.token_budget), "--trl-micro", str(args.trl_micro), "--lr", str(args.lr),
                   "--tokenizer", tok_dir, "--pairs", pairs_path, "--packed-passes", args.packed_passes]  # fmt: skip
    if args.tiny:
        passthrough.append("--tiny")
    for flag in ("gradient_checkpointing", "compile_blocks", "master_weights"):
        if getattr(args, flag):
            passthrough.append("--" + flag.replace("_", "-"))
    for system in args.systems:
        env = env_for_trl(None) if system.startswith("trl") else {}
        results["systems"][system] = run_worker(
            SCRIPT,
            ["--worker", system, *passthrough],
            os.path.join(work, f"rm_{system}.json"),
            args.timeout,
            env,
        )
        write_json(os.path.join(args.out, "rm_vs_trl.json"), results)
    ratios = {}
    for base in ("trl", "trl_default"):
        trl = results["systems"].get(base, {})
        for name, r in results["systems"].items():
            if name.startswith("ours") and "pairs_per_s" in r and "pairs_per_s" in trl:
                ratios[f"{name} / {base}"] = {
                    "speedup": r["pairs_per_s"] / trl["pairs_per_s"],
                    "memory_ratio": r["peak_allocated_gib"] / trl["peak_allocated_gib"]
                    if trl.get("peak_allocated_gib")
                    else float("nan"),
                }
    results["ratios"] = ratios
    write_json(os.path.join(args.out, "rm_vs_trl.json"), results)
    table = markdown(results)
    write_text(os.path.join(args.out, "rm_vs_trl.md"), table)
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
