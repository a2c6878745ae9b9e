"""GRPO step time, generated tokens/s and peak GPU memory: rlhf_kit against TRL's current GRPOTrainer,
and our critic-free GRPO against our own PPO (the memory and time a critic costs).

GPU (the numbers in docs/benchmarks.md; TRL 1.16 under /tmp/site, see bench/grpo_gpu.sh)::

    PYTHONPATH=/tmp/site:$PWD python bench/grpo_vs_trl.py --trl-site /tmp/site --out $OUT

CPU dry run (tiny models, 2 steps each, seconds)::

    python bench/grpo_vs_trl.py --tiny --out /tmp/bench_grpo [--systems ours_grpo ours_ppo]

Workload (bench config A, identical for every system): actor, reference and reward model of the same
random-init Llama architecture (plus a critic for our PPO); 64 HH prompts per step (left-truncated to
128 tokens), 4 samples each (256 sequences), 128 new tokens (temperature 1, EOS masked out so every
response is 128 tokens), one optimizer step over the 256 sequences in micro-batches of 16, AdamW,
KL to the reference as a k3 loss term with weight 0.04 (GRPO's), sequence mean of token means.
Precision: trainable models hold fp32 weights under bf16 autocast; reference and reward model are bf16.

Ours = the library pieces of ``recipes/ppo.py --advantage-estimator grpo``: ``repeat_prompts``,
``generate_rollouts`` with ``CompiledBackend``, ``score_rollouts`` (no critic), ``compute_advantages``,
``ppo_update`` actor-only, ``CompiledBackend.update_weights``; ``ours_ppo`` is the same step with
``--advantage-estimator gae`` (critic built, scored, trained). TRL = ``trl.GRPOTrainer`` with HF
``generate`` (its default, no vLLM), ``loss_type="grpo"``, ``beta=0.04``, the same reward model.

Each system runs in its own process (clean peak-memory counters); step times are synchronised
wall-clock, median over the steps after the warm-up ones (which include ``torch.compile``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    PhaseClock,
    build_tokenizer,
    env_for_trl,
    environment,
    fmt,
    hh_prompt_ids,
    llama_config,
    memory_stats,
    reset_peak_memory,
    run_worker,
    sync,
    write_json,
    write_text,
)
from bench.ppo_vs_trl import summarize  # noqa: E402

SCRIPT = os.path.abspath(__file__)
SYSTEMS = ("trl", "ours_grpo", "ours_ppo")
KL_COEF = 0.04


def shape(args: argparse.Namespace) -> dict[str, int]:
    """The per-step workload: prompts, samples per prompt, prompt length, new tokens, micro-batch."""
    if args.tiny:
        return {"batch": 4, "k": 4, "prompt_len": 32, "new_tokens": 16, "micro": 4}
    return {"batch": args.batch, "k": args.k, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "micro": args.micro}  # fmt: skip


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")


def _models(config: str, tok: Any, device: torch.device, frozen_dtype: torch.dtype, with_critic: bool):
    """Actor (seed 0, fp32), reference (bf16 copy), reward model (seed 2, bf16), critic (seed 1, fp32)
    only ``with_critic``: the same initial weights as bench/ppo_vs_trl.py."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device(device):
        torch.manual_seed(0)
        actor = AutoModelForCausalLM.from_config(llama_config(config, tok), dtype=torch.float32)
        critic = None
        if with_critic:
            torch.manual_seed(1)
            critic = AutoModelForSequenceClassification.from_config(
                llama_config(config, tok, 1), dtype=torch.float32
            )
        torch.manual_seed(2)
        rm = AutoModelForSequenceClassification.from_config(llama_config(config, tok, 1), dtype=frozen_dtype)
    ref = copy.deepcopy(actor).to(frozen_dtype)
    for m in (ref, rm):
        m.eval().requires_grad_(False)
    return actor, ref, critic, rm


# ----------------------------------------------------------------------------------------------------
# ours


def run_ours(args: argparse.Namespace, prompts: list[list[int]], estimator: str = "grpo") -> dict[str, Any]:
    """``estimator`` ``grpo`` (critic-free) or ``gae`` (our PPO on the same samples)."""
    from transformers import AutoTokenizer

    from rlhf_kit.data import PromptCollator
    from rlhf_kit.estimators import needs_critic
    from rlhf_kit.generation import CompiledBackend, SamplingParams
    from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
    from rlhf_kit.models import TokenValueModel, disable_dropout
    from rlhf_kit.models.compile import compile_blocks
    from rlhf_kit.ppo import (
        ExperienceConfig,
        PromptStream,
        RewardModelScorer,
        UpdateConfig,
        compute_advantages,
        generate_rollouts,
        ppo_update,
        repeat_prompts,
        score_rollouts,
    )
    from rlhf_kit.rollout import RolloutBuffer
    from rlhf_kit.training.optim import build_optimizer
    from rlhf_kit.training.precision import build_master_weight_optimizer

    device = _device(args)
    sh = shape(args)
    n = sh["batch"] * sh["k"]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    bf16 = device.type == "cuda"
    frozen = torch.bfloat16 if bf16 else torch.float32
    use_critic = needs_critic(estimator)
    actor, ref, critic_model, rm = _models(args.config, tok, device, frozen, use_critic)
    critic = TokenValueModel(critic_model) if use_critic else None
    for m in (actor, ref, critic, rm):
        if m is not None:
            disable_dropout(m)
    backend = CompiledBackend(
        copy.deepcopy(actor).to(frozen), max_batch_size=n, max_seq_len=sh["prompt_len"] + sh["new_tokens"]
    )
    if args.compile_blocks:  # regional torch.compile of every transformer block (recipes' --compile-blocks)
        for m in (actor, ref, critic, rm):
            if m is not None:
                compile_blocks(m)
    # bf16 weights with fp32 masters in AdamW (--master-weights), else fp32 weights under bf16 autocast
    make_opt = build_master_weight_optimizer if args.master_weights else build_optimizer
    actor_opt = make_opt(actor, args.lr, 0.0)
    critic_opt = make_opt(critic, args.lr, 0.0) if use_critic else None
    # one generation feeds one optimizer step: GRPO's scoring skips the actor (the recipe's default)
    skip = not use_critic and not args.recompute_old_logprobs
    exp_cfg = ExperienceConfig(
        temperature=1.0, micro_batch_size=args.score_micro or n, advantage_estimator=estimator,
        group_size=sh["k"], kl_in_loss=not use_critic, skip_old_logprobs=skip,
    )  # fmt: skip
    upd_cfg = UpdateConfig(
        mini_batch_size=n, micro_batch_size=sh["micro"], train_critic=use_critic, group_size=sh["k"]
    )
    params = SamplingParams(max_new_tokens=sh["new_tokens"], temperature=1.0, ignore_eos=True)
    stream = PromptStream(prompts, seed=0)
    collate = PromptCollator(tok.pad_token_id)
    if use_critic:  # PPO as in bench/ppo_vs_trl.py: KL in the reward, token mean
        policy_loss, value_loss, kl_reward = PPOPolicyLoss(0.2), ValueLoss(0.2), KL_COEF
    else:  # GRPO: KL as a k3 loss term, sequence mean of token means
        policy_loss = PPOPolicyLoss(0.2, aggregation="seq_mean_token_mean", kl_coef=KL_COEF)
        value_loss, kl_reward = None, 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not args.master_weights)
    clock = PhaseClock(device)
    steps: list[dict[str, Any]] = []
    reset_peak_memory(device)

    def one_step(step: int) -> dict[str, Any]:
        clock.start()
        batch = repeat_prompts(stream.next_batch(sh["batch"]), sh["k"])  # K samples of each prompt in a row
        with torch.no_grad():
            gens = generate_rollouts(backend, batch, collate, params, n, device, release=not args.keep_cache)
        clock.lap("generate")
        with autocast:
            data = score_rollouts(
                gens, actor, ref, critic, RewardModelScorer(rm), exp_cfg, None, tok.pad_token_id
            )
        data, stats = compute_advantages(data, kl_reward, exp_cfg)
        clock.lap("score")
        buffer = RolloutBuffer(pad_token_id=tok.pad_token_id, seed=step)
        buffer.set_data(data)
        with autocast:
            tstats = ppo_update(
                actor, critic, actor_opt, critic_opt, buffer, policy_loss, value_loss, upd_cfg, exp_cfg
            )
        clock.lap("train")
        backend.update_weights(actor)
        clock.lap("sync")
        return {
            "step_s": sum(clock.phases.values()),
            "phases_s": dict(clock.phases),
            "generated_tokens": sum(int(g.response_mask.sum()) for g in gens),
            "policy_loss": tstats.get("policy/loss"),
            "ref_kl": tstats.get("policy/ref_kl"),
            "kl_seq_mean": stats.get("kl/seq_mean", tstats.get("kl/seq_mean")),
            "score_mean": stats["reward/score_mean"],
        }

    for step in range(args.steps):
        steps.append(one_step(step))
        s = steps[-1]
        print(f"[ours {estimator}] step {step}: {s['step_s']:.3f}s "
              + " ".join(f"{k}={v:.3f}" for k, v in s["phases_s"].items()), flush=True)  # fmt: skip
    res = summarize(steps, args.warmup)
    res.update(memory_stats(device))
    res["estimator"], res["critic"], res["backend_mode"] = estimator, use_critic, backend.mode
    res["switches"] = {"compile_blocks": args.compile_blocks, "master_weights": args.master_weights,
                       "keep_cache": args.keep_cache, "skip_old_logprobs": skip, "micro": sh["micro"]}  # fmt: skip
    return res


# ----------------------------------------------------------------------------------------------------
# TRL


def run_trl(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """``trl.GRPOTrainer`` on the decoded prompts, the same models; per-step times from a callback."""
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16" if not args.tiny else "no")
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    device = _device(args)
    sh = shape(args)
    n = sh["batch"] * sh["k"]
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.padding_side = "left"
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    actor, _, _, rm = _models(args.config, tok, device, frozen, with_critic=False)
    # TRL builds its reference from the policy's path (model_init_kwargs' dtype): save it, reload it
    out_dir = tempfile.mkdtemp(prefix="trl_grpo_")
    actor.save_pretrained(os.path.join(out_dir, "actor"))
    del actor
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "actor"), dtype=torch.float32).to(
        device
    )
    texts = tok.batch_decode(prompts[: sh["batch"] * (args.steps + 1)], skip_special_tokens=True)
    train = Dataset.from_dict({"prompt": texts})

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, *a, **k):
            sync(device)
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            self.marks.append(time.perf_counter())

    timer = StepTimes()
    cfg = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=sh["micro"], gradient_accumulation_steps=n // sh["micro"],
        num_generations=sh["k"], max_completion_length=sh["new_tokens"], temperature=1.0,
        generation_kwargs={"min_new_tokens": sh["new_tokens"]},  # every response full length, as ours
        beta=KL_COEF, loss_type="grpo", learning_rate=args.lr, max_steps=args.steps,
        model_init_kwargs={"dtype": frozen},  # the reference's dtype (the policy is an instance)
        bf16=device.type == "cuda", use_cpu=device.type != "cuda", report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, log_completions=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=policy, reward_funcs=rm, args=cfg, train_dataset=train, processing_class=tok,
        reward_processing_classes=tok, callbacks=[timer],
    )  # fmt: skip
    reset_peak_memory(device)
    trainer.train()
    mem = memory_stats(device)
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    lengths = [r.get("completions/mean_length") for r in trainer.state.log_history]
    lengths = [x for x in lengths if x is not None]
    per_step = n * (sum(lengths) / len(lengths) if lengths else sh["new_tokens"])
    res = summarize([{"step_s": t, "generated_tokens": per_step} for t in times], args.warmup)
    res.update(mem)
    res["trl_version"] = trl.__version__
    res["completion_mean_length"] = lengths
    return res


# ----------------------------------------------------------------------------------------------------
# orchestration


def worker_main(args: argparse.Namespace) -> None:
    with open(args.prompts) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()
    if args.worker == "trl":
        res = run_trl(args, prompts)
    else:
        res = run_ours(args, prompts, "grpo" if args.worker == "ours_grpo" else "gae")
    res.update(system=args.worker, config=args.config, worker_s=time.perf_counter() - t0, env=environment())
    write_json(args.result, res)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| system | median step s | generated tok/s | peak alloc GiB | generate / score / train / sync s |",
        "|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        r = results["systems"].get(name)
        if r is None:
            continue
        if "median_step_s" not in r:
            lines.append(f"| {name} | failed: {r.get('error', '?')} | | | |")
            continue
        ph = r.get("median_phases_s")
        split = " / ".join(fmt(v, ".3f") for v in ph.values()) if ph else ""
        lines.append(f"| {name} | {fmt(r['median_step_s'], '.3f')} | {fmt(r['generated_tokens_per_s'], '.0f')} | "
                     f"{fmt(r['peak_allocated_gib'])} | {split} |")  # fmt: skip
    for key, label in (("vs_trl", "ours_grpo vs TRL"), ("vs_ppo", "ours_grpo vs ours_ppo")):
        c = results.get(key)
        if c:
            mem = f"{c['memory_ratio']:.2f}x the memory" if "memory_ratio" in c else "memory n/a (CPU)"
            lines.append(f"| **{label}** | **{c['speedup']:.2f}x faster** | | **{mem}** | |")
    return "\n".join(lines) + "\n"


def ratio(a: dict, b: dict) -> dict | None:
    """How ``a`` compares with ``b``: step-time speedup and peak-memory ratio (None if either failed)."""
    if "median_step_s" not in a or "median_step_s" not in b:
        return None
    out = {"speedup": b["median_step_s"] / a["median_step_s"]}
    if a.get("peak_allocated_gib") and b.get("peak_allocated_gib"):
        out["memory_ratio"] = a["peak_allocated_gib"] / b["peak_allocated_gib"]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny models, 4 prompts x 4 x 16 tokens")
    ap.add_argument("--steps", type=int, default=4, help="steps per system, the first --warmup are warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64, help="prompts per step")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro", type=int, default=16, help="training micro-batch (sequences)")
    ap.add_argument("--score-micro", type=int, default=64, help="ours: scoring micro-batch (0: whole batch)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument(
        "--compile-blocks", action="store_true", help="ours: torch.compile each transformer block"
    )
    ap.add_argument(
        "--master-weights", action="store_true", help="ours: bf16 weights, fp32 masters, no autocast"
    )
    ap.add_argument(
        "--keep-cache", action="store_true", help="ours: keep KV cache and CUDA graphs between steps"
    )
    ap.add_argument("--recompute-old-logprobs", action="store_true",
                    help="ours_grpo: score with the actor too (off: the update's forward supplies them)")  # fmt: skip
    ap.add_argument("--trl-site", default=None, help="folder holding TRL 1.16 (put first on PYTHONPATH)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per worker")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--work", default=None, help="scratch folder (default /tmp/bench_grpo_work)")
    # worker-only
    ap.add_argument("--worker", choices=SYSTEMS, default=None)
    ap.add_argument("--config", default="A")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--result", default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.config, args.steps = "tiny", min(args.steps, 2)
    if args.worker:
        worker_main(args)
        return {}
    work = args.work or os.path.join("/tmp", "bench_grpo_work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    sh = shape(args)
    tok_dir = os.path.join(work, "tokenizer_tiny" if args.tiny else "tokenizer_8k")
    tok = build_tokenizer(tok_dir, args.tiny)
    prompts = hh_prompt_ids(tok, sh["prompt_len"])
    prompts_path = os.path.join(work, f"prompts_{sh['prompt_len']}.json")
    write_json(prompts_path, prompts)
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/grpo_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "workload": sh, "steps": args.steps, "warmup": args.warmup, "kl_coef": KL_COEF, "systems": {},
    }  # fmt: skip
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--k", str(args.k), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--micro", str(args.micro), "--score-micro", str(args.score_micro), "--lr", str(args.lr),
                   "--config", args.config, "--tokenizer", tok_dir, "--prompts", prompts_path]  # fmt: skip
    for flag in ("compile_blocks", "master_weights", "keep_cache", "recompute_old_logprobs"):
        if getattr(args, flag):
            passthrough.append("--" + flag.replace("_", "-"))
    if args.tiny:
        passthrough.append("--tiny")
    for system in args.systems:
        env = env_for_trl(args.trl_site) if system == "trl" else {}
        results["systems"][system] = run_worker(
            SCRIPT,
            ["--worker", system, *passthrough],
            os.path.join(work, f"{system}.json"),
            args.timeout,
            env,
        )
        write_json(os.path.join(args.out, "grpo_vs_trl.json"), results)
    s = results["systems"]
    results["vs_trl"] = ratio(s.get("ours_grpo", {}), s.get("trl", {}))
    results["vs_ppo"] = ratio(s.get("ours_grpo", {}), s.get("ours_ppo", {}))
    write_json(os.path.join(args.out, "grpo_vs_trl.json"), results)
    table = markdown(results)
    write_text(os.path.join(args.out, "grpo_vs_trl.md"), table)
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
