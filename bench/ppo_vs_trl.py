"""PPO step time, generated tokens/s and peak GPU memory: rlhf_kit against TRL 1.12's PPOTrainer.

GPU (the numbers in docs/benchmarks.md; TRL 1.12.0 installed under /tmp/site112)::

    PYTHONPATH=$PWD python bench/ppo_vs_trl.py --configs A B --trl-site /tmp/site112 --out $OUT

CPU dry run (tiny models, 2 steps, seconds)::

    python bench/ppo_vs_trl.py --tiny --out /tmp/bench_ppo [--systems ours]

Workload (bench config A or B, identical for both systems): actor, reference, critic and reward model
of the same random-init Llama architecture; 64 HH prompts per step (left-truncated to 128 tokens), 128
sampled new tokens each (temperature 1, no early stop), one PPO epoch over one mini-batch of 64 as 4
micro-batches of 16, AdamW. Precision (both): trainable actor and critic hold fp32 weights and run
under bf16 autocast; reference and reward model are frozen bf16 copies.

Ours = the library composition of ``recipes/ppo.py``: ``generate_rollouts`` with ``CompiledBackend``
(its own bf16 copy of the actor), ``score_rollouts``, ``compute_advantages``, ``ppo_update``, then
``CompiledBackend.update_weights``. TRL = ``trl.experimental.ppo.PPOTrainer`` (HF ``generate`` with
``output_scores``; per-step times from a callback at each step's end).

Each system runs in its own process (clean peak-memory counters); step times are synchronised
wall-clock, median over the steps after the first (warm-up; it includes ``torch.compile``).
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
    matmul_peak_tflops,
    median_after_warmup,
    memory_stats,
    phase_device_times,
    reset_peak_memory,
    run_worker,
    sync,
    train_model_flops,
    write_json,
    write_text,
)

SCRIPT = os.path.abspath(__file__)


def shape(args: argparse.Namespace) -> dict[str, int]:
    """The per-step workload: prompts, prompt length, new tokens, micro-batch."""
    if args.tiny:
        return {"batch": 8, "prompt_len": 32, "new_tokens": 16, "micro": 4}
    return {
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "micro": args.micro,
    }


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")


def _models(config: str, tok: Any, device: torch.device, train_dtype: torch.dtype, frozen_dtype: torch.dtype):
    """Actor (seed 0), reference (copy of the actor), critic (seed 1), reward model (seed 2), same
    initial weights for both systems."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device(device):
        torch.manual_seed(0)
        actor = AutoModelForCausalLM.from_config(llama_config(config, tok), dtype=train_dtype)
        torch.manual_seed(1)
        critic = AutoModelForSequenceClassification.from_config(
            llama_config(config, tok, 1), dtype=train_dtype
        )
        torch.manual_seed(2)
        rm = AutoModelForSequenceClassification.from_config(llama_config(config, tok, 1), dtype=frozen_dtype)
    ref = copy.deepcopy(actor).to(frozen_dtype)
    for m in (ref, rm):
        m.eval().requires_grad_(False)
    return actor, ref, critic, rm


# ----------------------------------------------------------------------------------------------------
# ours


def run_ours(args: argparse.Namespace, prompts: list[list[int]], save=None) -> dict[str, Any]:
    """Our PPO steps; ``save(res)``, when given, is called before each extra (profiled) pass with the
    results so far and the pass's name as ``pending``, so a pass that crashes the process loses only itself."""
    from transformers import AutoTokenizer

    import rlhf_kit.logprobs

    rlhf_kit.logprobs.FUSED = {"auto": None, "on": True, "off": False}[args.fused_logprobs]

    from rlhf_kit.data import PromptCollator
    from rlhf_kit.generation import CompiledBackend, SamplingParams, decode_kernel
    from rlhf_kit.generation.resharding import iter_full_params
    from rlhf_kit.losses import PPOPolicyLoss, ValueLoss
    from rlhf_kit.models import TokenValueModel, disable_dropout
    from rlhf_kit.models.compile import compile_blocks, dependent_launch
    from rlhf_kit.ppo import (
        ExperienceConfig,
        PromptStream,
        RewardModelScorer,
        UpdateConfig,
        advantages_now_or_in_update,
        generate_rollouts,
        ppo_update,
        score_rollouts,
    )
    from rlhf_kit.rollout import RolloutBuffer
    from rlhf_kit.training.memory_budget import MemoryBudget, cuda_probe
    from rlhf_kit.training.metrics import compile_stats
    from rlhf_kit.training.offload import offload_model, offloaded
    from rlhf_kit.training.precision import make_optimizer

    decode_kernel.CONFIG.update(json.loads(args.decode_kernel))  # read when the decode step is captured
    device = _device(args)
    peak = matmul_peak_tflops(device)  # before any model: the card's bf16 matrix rate, for the train MFU
    torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention)  # as the recipes' make_accelerator does
    sh = shape(args)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    bf16 = device.type == "cuda"
    frozen = torch.bfloat16 if bf16 else torch.float32
    actor, ref, critic_model, rm = _models(args.config, tok, device, torch.float32, frozen)
    critic = TokenValueModel(critic_model)
    for m in (actor, ref, critic, rm):
        disable_dropout(m)
    backend = CompiledBackend(
        copy.deepcopy(actor).to(frozen),
        max_batch_size=sh["batch"],
        max_seq_len=sh["prompt_len"] + sh["new_tokens"],
        decode_chains=args.decode_chains,
    )
    fsdp_bf16 = bool(args.fsdp_bf16)
    if fsdp_bf16:  # bf16 compute weights, fp32 master weights and gradient reduction (FSDP2, world 1)
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from rlhf_kit.training.fsdp import apply_fsdp2

        if not dist.is_initialized():
            backend_name = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend_name, init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        apply_fsdp2(actor, mixed_precision=policy)
        apply_fsdp2(critic, mixed_precision=policy)
    if args.fp8_backward != "off":  # FP8 backward products in actor and critic, before compiling (models.fp8)
        from rlhf_kit.models.fp8 import convert_to_fp8_backward

        for m in (actor, critic):
            convert_to_fp8_backward(m, args.fp8_backward)
    if args.compile_blocks:  # regional torch.compile of every transformer block of the four models
        for m in (actor, ref, critic, rm):
            # PDL on Hopper, as the recipes' placement does
            compile_blocks(m, **dependent_launch(device, {"dynamic": True} if args.compile_dynamic else {}))
    lowbit = args.optimizer == "adamw8bit" and not fsdp_bf16  # bf16 weights, 8-bit moments (torchao)
    master = bool(args.master_weights) and not fsdp_bf16 and not lowbit
    # master: bf16 weights in the models, fp32 master weights in AdamW (rlhf_kit.training.precision)
    kind = "adamw8bit" if lowbit else "adamw"
    actor_opt = make_optimizer(actor, args.lr, 0.0, kind=kind, master_weights=master)
    critic_opt = make_optimizer(critic, args.lr, 0.0, kind=kind, master_weights=master)
    exp_cfg = ExperienceConfig(
        temperature=1.0,
        micro_batch_size=args.score_micro or sh["batch"],
        old_logprobs=args.old_logprobs,
        packed=args.packed_passes,
        score_in_update=args.score_in_update,
    )
    upd_cfg = UpdateConfig(
        mini_batch_size=sh["batch"],
        micro_batch_size=sh["micro"],
        ppo_epochs=1,
        micro_batch_tokens=args.micro_tokens,
        packed=args.packed_passes,
    )
    budget = None  # --micro-memory: the recipe's --micro-batch-memory (rlhf_kit.training.memory_budget)
    if args.micro_tokens > 0 and args.micro_memory > 0:
        budget = MemoryBudget(args.micro_tokens, args.micro_memory, sh["batch"] * (sh["prompt_len"] + sh["new_tokens"]),
                              cuda_probe(device) if device.type == "cuda" else None)  # fmt: skip
    params = SamplingParams(max_new_tokens=sh["new_tokens"], temperature=1.0, ignore_eos=True)
    stream = PromptStream(prompts, seed=0)
    collate = PromptCollator(tok.pad_token_id)
    policy_loss, value_loss = PPOPolicyLoss(0.2), ValueLoss(0.2)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=bf16 and not (fsdp_bf16 or master or lowbit)
    )
    idle = [ref, rm] if args.offload_idle else []  # as recipes/ppo.py --offload-idle-models
    for m in idle:
        offload_model(m)
    clock = PhaseClock(device)
    steps: list[dict[str, Any]] = []
    reset_peak_memory(device)

    def one_step(step: int) -> dict[str, Any]:
        clock.start()
        batch = stream.next_batch(sh["batch"])
        with torch.no_grad(), offloaded(*idle, device=device):  # idle models come back for scoring
            gens = generate_rollouts(
                backend, batch, collate, params, sh["batch"], device, release=not args.keep_cache
            )
        clock.lap("generate")
        with autocast:
            data = score_rollouts(
                gens,
                actor,
                ref,
                critic,
                RewardModelScorer(rm, args.packed_passes),
                exp_cfg,
                None,
                tok.pad_token_id,
            )
        for m in idle:  # on the host again until the next scoring phase
            offload_model(m)
        data, stats, advantages = advantages_now_or_in_update(data, 0.05, exp_cfg)  # or in the update
        clock.lap("score")
        buffer = RolloutBuffer(pad_token_id=tok.pad_token_id, seed=step)
        buffer.set_data(data)
        with autocast:
            tstats = ppo_update(
                actor, critic, actor_opt, critic_opt, buffer, policy_loss, value_loss, upd_cfg, exp_cfg,
                budget=budget, advantages=advantages,
            )  # fmt: skip
            stats = stats or tstats  # with --score-in-update the rollout's statistics come from the update
        clock.lap("train")
        backend.update_weights(iter_full_params(actor) if fsdp_bf16 else actor)
        clock.lap("sync")
        n_tok = sum(int(g.response_mask.sum()) for g in gens)
        return {
            "step_s": sum(clock.phases.values()),
            "phases_s": dict(clock.phases),
            "generated_tokens": n_tok,
            "seq_width": int(gens[0].sequences.shape[1]),
            "prompt_tokens": int(sum(len(p) for p in batch)),
            "policy_loss": tstats.get("policy/loss"),
            "value_loss": tstats.get("value/loss"),
            "kl": stats["kl/seq_mean"],
            "micro_batch_tokens": tstats.get("batch/micro_batch_tokens"),
        }

    for step in range(args.steps):
        steps.append(one_step(step))
        s = steps[-1]
        s["compile"] = compile_stats(prefix="")  # cumulative: a step whose frames rose compiled
        print(f"[ours {args.config}] step {step}: {s['step_s']:.3f}s "
              + " ".join(f"{k}={v:.3f}" for k, v in s["phases_s"].items())
              + f" compiled_frames={s['compile'].get('frames', 0):.0f}", flush=True)  # fmt: skip
    mem = memory_stats(device)
    res = summarize(steps, args.warmup)
    res.update(mem)
    res["backend_mode"] = backend.mode
    res["decode_attention"] = getattr(backend, "decode_attention", None)
    import rlhf_kit  # which tree ran: an A/B of two trees must not import the same one twice

    res["rlhf_kit"] = os.path.dirname(os.path.abspath(rlhf_kit.__file__))
    res["offload_idle"] = bool(args.offload_idle)
    res["fsdp_bf16"] = fsdp_bf16
    res["master_weights"] = master
    res["optimizer"] = kind
    res["old_logprobs"] = args.old_logprobs
    res["packed_passes"] = args.packed_passes
    res["fused_logprobs"] = args.fused_logprobs
    res["cudnn_attention"] = args.cudnn_attention
    res["compile_blocks"] = bool(args.compile_blocks)
    res["compile_dynamic"] = bool(args.compile_dynamic)
    res["fp8_backward"] = args.fp8_backward
    res["keep_cache"] = bool(args.keep_cache)
    from torch._dynamo.utils import counters  # how often the compiled blocks were traced again

    res["dynamo"] = {k: dict(counters[k]) for k in ("stats", "recompiles") if k in counters}
    # one epoch of one mini-batch: every rollout goes forward and backward once through actor and critic
    flops = sum(train_model_flops(m, sh["batch"], steps[-1]["seq_width"]) for m in (actor, critic))
    train_s = res.get("median_phases_s", {}).get("train", float("nan"))
    res["train_model_tflop"] = flops / 1e12  # of the padded rows; packed passes skip the padding
    last = steps[-1]
    res["real_token_fraction"] = (last["prompt_tokens"] + last["generated_tokens"]) / (
        sh["batch"] * last["seq_width"]
    )
    res["train_tflops_per_s"] = flops / train_s / 1e12
    res["matmul_peak_tflops"] = peak
    res["train_mfu"] = res["train_tflops_per_s"] / peak
    passes = {  # extra passes after the timed steps, each saved as soon as it ends
        "profile": (
            args.profile and device.type == "cuda",
            lambda: profile_step(one_step, args.steps, device, clock),
        ),
        "trace_gaps": (
            args.trace_gaps and device.type == "cuda",
            lambda: profile_step(one_step, args.steps + 3, device, clock, stack=True),
        ),
        "syncs": (
            args.sync_report and device.type == "cuda",
            lambda: sync_report(one_step, args.steps + 1, clock),
        ),
        "cprofile": (bool(args.cprofile), lambda: host_profile(one_step, args.steps + 2, args.cprofile)),
    }
    for name, (wanted, run) in passes.items():
        if not wanted:
            continue
        if save is not None:
            save({**res, "pending": name})  # the pass about to run: named in the result if it never ends
        res[name] = run()
    return res


def host_profile(one_step, first: int, n: int, top: int = 45) -> dict[str, Any]:
    """``n`` more steps under cProfile: where the host spends a step's time, per phase and per function (the
    phase times say how long each phase took under the profiler; a phase's host time above its device time
    is launch or Python overhead)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    phases = []
    for i in range(n):
        prof.enable()
        one = one_step(first + i)
        prof.disable()
        phases.append(one["phases_s"])
    out = {"steps": n, "phases_s": phases}
    stats = pstats.Stats(prof).strip_dirs()  # one table, printed three ways
    for key in ("tottime", "cumulative"):
        stats.stream = buf = io.StringIO()
        stats.sort_stats(key).print_stats(top)
        out[key] = buf.getvalue().splitlines()
    stats.stream = buf = io.StringIO()  # who walks the module trees every step (each .parameters() call does)
    stats.sort_stats("tottime").print_callers("named_parameters|named_buffers|named_modules")
    out["named_modules_callers"] = buf.getvalue().splitlines()
    return out


def sync_report(one_step, step: int, clock: PhaseClock) -> dict[str, Any]:
    """One extra step under ``torch.cuda.set_sync_debug_mode("warn")``: each operation that made the host
    wait for the device (a read of a value, a copy from pageable memory, ``nonzero``...), counted per phase
    and per source line (the Python line that called it). The clock's own synchronisations do not warn."""
    import collections
    import warnings

    seen: list[tuple[int, str]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen.append((len(clock.laps), f"{filename.split('site-packages/')[-1]}:{lineno}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step(step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    names = list(clock.laps)
    phase = [names[i] if i < len(names) else "after" for i, _ in seen]
    where = collections.Counter(f"{p} {src}" for p, (_, src) in zip(phase, seen))
    return {"total": len(seen), "per_phase": dict(collections.Counter(phase)), "top": where.most_common(20)}


def trace_gaps(prof, names: list[str]) -> dict[str, Any]:
    """:func:`bench.trace_gaps.gap_report` of a finished profile (its chrome trace written to a temporary
    file and read back), the ``phase#i`` ranges renamed after ``names``."""
    import tempfile

    from bench.trace_gaps import gap_report

    def named(phase: str) -> str:  # "phase#i" -> names[i]
        i = int(phase.split("#")[1])
        return names[i] if i < len(names) else phase

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            rep = gap_report(json.load(f))
    rep["phases"] = {named(k): v for k, v in rep["phases"].items()}
    for g in rep["largest"]:
        g["phase"] = named(g["phase"])
    return rep


def profile_step(
    one_step, step: int, device: torch.device, clock: PhaseClock, stack: bool = False
) -> dict[str, Any]:
    """One extra step under ``torch.profiler``: the top CUDA kernels by total device time, per phase the
    device-busy seconds, kernel count and top kernels (:func:`phase_device_times`), and the device's idle
    gaps (:func:`trace_gaps`; with ``stack``, charged to the host's Python stacks, which the profiler's
    Python tracer slows)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stack) as prof:
        one = one_step(step)
    sync(device)
    gaps = trace_gaps(prof, list(clock.laps))
    if stack:
        return {"step_s": one["step_s"], "phases_s": one["phases_s"], "gaps": gaps}
    phases = phase_device_times(prof, clock.laps)
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / 1e6
    top = [
        {"name": e.key[:120], "self_device_s": e.self_device_time_total / 1e6, "calls": e.count}
        for e in events[:25]
    ]
    return {"step_s": one["step_s"], "phases_s": one["phases_s"], "device_busy_s": total, "top_kernels": top,
            "phases": phases, "gaps": gaps}  # fmt: skip


def summarize(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    times = [s["step_s"] for s in steps]
    med = median_after_warmup(times, warmup)
    timed = steps[warmup:]
    tokens = sum(s["generated_tokens"] for s in timed) / max(len(timed), 1)
    out: dict[str, Any] = {
        "steps": steps,
        "step_times_s": times,
        "median_step_s": med,
        "generated_tokens_per_step": tokens,
        "generated_tokens_per_s": tokens / med if med == med and med > 0 else float("nan"),
    }
    if timed and "phases_s" in timed[0]:
        import statistics

        out["median_phases_s"] = {
            k: statistics.median(s["phases_s"][k] for s in timed) for k in timed[0]["phases_s"]
        }
    return out


# ----------------------------------------------------------------------------------------------------
# TRL


def run_trl(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16" if not args.tiny else "no")
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    device = _device(args)
    sh = shape(args)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.padding_side = "left"
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy, ref, value, rm = _models(args.config, tok, device, torch.float32, frozen)
    # the same prompt distribution as ours: PPOTrainer shuffles it with its own seed
    train = Dataset.from_dict({"input_ids": prompts})
    accum = sh["batch"] // sh["micro"]

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
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    cfg = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=sh["micro"],
        gradient_accumulation_steps=accum,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=sh["batch"],
        response_length=sh["new_tokens"],
        temperature=1.0,
        stop_token=None,
        total_episodes=sh["batch"] * args.steps,
        num_sample_generations=0,
        learning_rate=args.lr,
        kl_coef=0.05,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=rm,
        value_model=value,
        train_dataset=train,
        eval_dataset=train.select(range(sh["batch"])),
        callbacks=[timer],
    )
    reset_peak_memory(device)
    trainer.train()
    mem = memory_stats(device)
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    steps = [{"step_s": t, "generated_tokens": sh["batch"] * sh["new_tokens"]} for t in times]
    res = summarize(steps, args.warmup)
    res.update(mem)
    res["trl_version"] = trl.__version__
    res["mixed_precision"] = os.environ.get("ACCELERATE_MIXED_PRECISION")
    return res


# ----------------------------------------------------------------------------------------------------
# orchestration


def worker_main(args: argparse.Namespace) -> None:
    with open(args.prompts) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()

    def save(res: dict[str, Any]) -> None:
        res.update(
            system=args.worker, config=args.config, worker_s=time.perf_counter() - t0, env=environment()
        )
        write_json(args.result, res)

    save(run_ours(args, prompts, save) if args.worker == "ours" else run_trl(args, prompts))


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| config | system | median step s | generated tok/s | peak alloc GiB | generate / score / train / sync s |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        for name in ("trl", "ours"):
            r = c.get(name)
            if r is None:
                continue
            if "median_step_s" not in r:
                lines.append(f"| {c['config']} | {name} | failed: {r.get('error', '?')} | | | |")
                continue
            if r.get("error"):  # the timed steps ended; an extra pass then failed
                lines.append(
                    f"| {c['config']} | {name} | {r.get('pending', 'a pass')} failed: {r['error']} | | | |"
                )
            ph = r.get("median_phases_s")
            split = " / ".join(fmt(v, ".3f") for v in ph.values()) if ph else ""
            lines.append(
                f"| {c['config']} | {name} | {fmt(r['median_step_s'], '.3f')} | "
                f"{fmt(r['generated_tokens_per_s'], '.0f')} | {fmt(r['peak_allocated_gib'])} | {split} |"
            )
        ours = c.get("ours") or {}
        if ours.get("train_model_tflop"):
            lines.append(
                f"| {c['config']} | ours, train phase | {fmt(ours['train_model_tflop'], '.1f')} TFLOP at "
                f"{fmt(ours['train_tflops_per_s'], '.0f')} TFLOP/s = {fmt(100 * ours['train_mfu'], '.0f')}% of "
                f"{fmt(ours['matmul_peak_tflops'], '.0f')} (bf16 matmul, measured) | | | |"
            )
        if ours.get("syncs"):  # --sync-report
            sy = ours["syncs"]
            per = ", ".join(f"{k} {v}" for k, v in sy["per_phase"].items())
            lines.append(f"| {c['config']} | ours, host waits in one step | {sy['total']} ({per}) | | | |")
        if c.get("speedup"):
            lines.append(
                f"| {c['config']} | **ratio** | **{c['speedup']:.2f}x faster** | | "
                f"**{fmt(c.get('memory_ratio'))}x of TRL's memory** | |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the orchestrator and of its workers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--configs", nargs="+", default=["A"], help="A, B and/or S (SmolLM2-135M widths); tiny with --tiny"
    )
    ap.add_argument("--systems", nargs="+", default=["trl", "ours"])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny models, 8 prompts x 16 tokens")
    ap.add_argument("--steps", type=int, default=6, help="steps per system, the first is warm-up")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--micro", type=int, default=16, help="training micro-batch")
    ap.add_argument(
        "--micro-tokens", type=int, default=0, help="ours: training micro-batches by this token budget"
    )
    ap.add_argument(
        "--micro-memory", type=float, default=0.0,
        help="ours, with --micro-tokens: grow the budget after step 1 to this share of the GPU (MemoryBudget)",
    )  # fmt: skip
    ap.add_argument("--score-micro", type=int, default=0, help="ours: scoring micro-batch (0: whole batch)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--profile", action="store_true", help="ours: one more step under torch.profiler")
    ap.add_argument(
        "--trace-gaps", action="store_true",
        help="ours: one more step profiled with Python stacks; the device's idle gaps charged to them",
    )  # fmt: skip
    ap.add_argument(
        "--sync-report", action="store_true",
        help="ours: one more step under CUDA sync debug mode: the host's waits per phase and source line",
    )  # fmt: skip
    ap.add_argument(
        "--offload-idle", action="store_true", help="ours: reference and RM on the host except while scoring"
    )
    ap.add_argument("--fsdp-bf16", action="store_true", help="ours: FSDP2 bf16 params, fp32 master weights")
    ap.add_argument(
        "--compile-blocks", action="store_true", help="ours: torch.compile each transformer block"
    )
    ap.add_argument(
        "--compile-dynamic",
        action="store_true",
        help="ours, with --compile-blocks: symbolic shapes from the first compilation (dynamic=True), "
        "not first static and then recompiled dynamic when step 2 brings a new length",
    )
    ap.add_argument(
        "--master-weights",
        action="store_true",
        help="ours: bf16 model weights, fp32 masters in AdamW, no autocast",
    )
    ap.add_argument(
        "--fp8-backward", choices=["off", "weights", "all"], default="off",
        help="ours: FP8 weight-gradient (weights) or weight- and input-gradient (all) products (rlhf_kit.models.fp8)",
    )  # fmt: skip
    ap.add_argument(
        "--optimizer",
        choices=["adamw", "adamw8bit"],
        default="adamw",
        help="ours: adamw8bit is torchao's 8-bit AdamW over bf16 weights (overrides --master-weights)",
    )
    ap.add_argument(
        "--keep-cache", action="store_true", help="ours: keep KV cache and CUDA graphs between steps"
    )
    ap.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="ours: let SDPA pick cuDNN attention (the recipes' default turns it off: make_accelerator)",
    )
    ap.add_argument(
        "--old-logprobs", choices=["recompute", "sampler"], default="recompute",
        help="ours: the old policy's log-probs from an actor pass or from the sampler (ExperienceConfig)",
    )  # fmt: skip
    ap.add_argument(
        "--packed-passes", choices=["auto", "on", "off"], default="auto",
        help="ours: score and train padding-free under variable-length attention (rlhf_kit.models.varlen); "
        "auto, as in the recipe: on CUDA",
    )  # fmt: skip
    ap.add_argument(
        "--fused-logprobs", choices=["auto", "on", "off"], default="auto",
        help="ours: log-probs and entropies through one compiled function (rlhf_kit.logprobs.FUSED; auto: on CUDA)",
    )  # fmt: skip
    ap.add_argument(
        "--score-in-update", action="store_true",
        help="ours: the update's forward scores the rollout (ExperienceConfig.score_in_update, the recipe's flag)",
    )  # fmt: skip
    ap.add_argument(
        "--decode-kernel", default="{}", help="ours: JSON over rlhf_kit.generation.decode_kernel.CONFIG"
    )
    ap.add_argument("--decode-chains", type=int, default=1, help="ours: CompiledBackend(decode_chains=)")
    ap.add_argument(
        "--cprofile", type=int, default=0,
        help="ours: this many more steps under cProfile, the top functions by own and cumulative time in the JSON",
    )  # fmt: skip
    ap.add_argument("--trl-site", default=None, help="folder holding TRL 1.12 (put first on PYTHONPATH)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per worker")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--work", default=None, help="scratch folder (default: <out>/../ppo_work or /tmp)")
    # worker-only
    ap.add_argument("--worker", choices=["ours", "trl"], default=None)
    ap.add_argument("--config", default="A")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--result", default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.configs, args.steps = ["tiny"], min(args.steps, 2)
    if args.worker:
        worker_main(args)
        return {}

    work = args.work or os.path.join("/tmp", "bench_ppo_work")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    sh = shape(args)
    tok_dir = os.path.join(work, "tokenizer_tiny" if args.tiny else "tokenizer_8k")
    t0 = time.perf_counter()
    tok = build_tokenizer(tok_dir, args.tiny)
    prompts = hh_prompt_ids(tok, sh["prompt_len"])
    prompts_path = os.path.join(work, f"prompts_{sh['prompt_len']}.json")
    write_json(prompts_path, prompts)
    print(f"tokenizer ({len(tok)}) and {len(prompts)} prompts in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/ppo_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "workload": sh,
        "steps": args.steps,
        "warmup": args.warmup,
        "prompts_at_max_length": sum(len(p) == sh["prompt_len"] for p in prompts) / len(prompts),
        "configs": [],
    }
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--micro", str(args.micro), "--micro-tokens", str(args.micro_tokens), "--micro-memory", str(args.micro_memory), "--score-micro", str(args.score_micro), "--lr", str(args.lr),
                   "--tokenizer", tok_dir, "--prompts", prompts_path]  # fmt: skip
    if args.tiny:
        passthrough.append("--tiny")
    if args.profile:
        passthrough.append("--profile")
    if args.sync_report:
        passthrough.append("--sync-report")
    if args.trace_gaps:
        passthrough.append("--trace-gaps")
    if args.offload_idle:
        passthrough.append("--offload-idle")
    flags = (
        ("--fsdp-bf16", args.fsdp_bf16),
        ("--keep-cache", args.keep_cache),
        ("--master-weights", args.master_weights),
        ("--compile-blocks", args.compile_blocks),
        ("--compile-dynamic", args.compile_dynamic),
        ("--cudnn-attention", args.cudnn_attention),
        ("--score-in-update", args.score_in_update),
    )
    passthrough += [f for f, on in flags if on] + [
        "--optimizer",
        args.optimizer,
        "--old-logprobs",
        args.old_logprobs,
        "--packed-passes",
        args.packed_passes,
        "--decode-kernel",
        args.decode_kernel,
        "--decode-chains",
        str(args.decode_chains),
        "--cprofile",
        str(args.cprofile),
        "--fp8-backward",
        args.fp8_backward,
        "--fused-logprobs",
        args.fused_logprobs,
    ]
    for config in args.configs:
        entry: dict[str, Any] = {"config": config}
        for system in args.systems:
            env = env_for_trl(args.trl_site) if system == "trl" else {}
            entry[system] = run_worker(
                SCRIPT,
                ["--worker", system, "--config", config, *passthrough],
                os.path.join(work, f"{config}_{system}.json"),
                args.timeout,
                env,
            )
        ours, trl = entry.get("ours", {}), entry.get("trl", {})
        if "median_step_s" in ours and "median_step_s" in trl:
            entry["speedup"] = trl["median_step_s"] / ours["median_step_s"]
            if trl.get("peak_allocated_gib"):
                entry["memory_ratio"] = ours["peak_allocated_gib"] / trl["peak_allocated_gib"]
        results["configs"].append(entry)
        write_json(os.path.join(args.out, "ppo_vs_trl.json"), results)
    table = markdown(results)
    write_text(os.path.join(args.out, "ppo_vs_trl.md"), table)
    print(table, flush=True)
    return results


if __name__ == "__main__":
    main()
