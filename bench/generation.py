"""Generation throughput: HFBackend vs CompiledBackend, with the memory-bandwidth floor beside them.

GPU (the numbers in docs/benchmarks.md)::

    PYTHONPATH=$PWD python bench/generation.py --out $OUT

CPU smoke run (tiny model, seconds)::

    python bench/generation.py --tiny --out /tmp/bench_gen

Configs: ``A`` = random-init Llama, hidden 1024, 16 layers, 16 heads / 8 KV heads, FFN 2816, an 8k
byte-level BPE trained on the shipped HH file; ``1B`` = hidden 2048, 22 layers, 32 / 8 heads, FFN 5632.
Prompts: HH dialogues cut after the last ``Assistant:``, left-truncated to 128 tokens, left padded; batch
64 x 128 new tokens at temperature 1, no early stop (``ignore_eos``), bf16. Times are medians of
CUDA-synchronised wall-clock runs after warm-up.

Floor: every decode step must read all weights except the input embedding, plus the KV cache of the
context so far (``2 * layers * kv_heads * head_dim * bytes * batch * context``); the sum over the 128
steps divided by the measured device-to-device copy bandwidth (bytes read + written).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_kit import default_hh_file  # noqa: E402
from rlhf_kit.generation import CompiledBackend, HFBackend, SamplingParams, decode_kernel  # noqa: E402
from rlhf_kit.generation import compiled as compiled_mod  # noqa: E402
from rlhf_kit.tiny import train_tokenizer  # noqa: E402

DEFAULT_KERNEL = dict(decode_kernel.CONFIG)  # each variant starts from the library's decode-kernel settings

CONFIGS: dict[str, dict[str, int]] = {
    "A": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
              intermediate_size=2816),
    "1B": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=5632),
    # SmolLM2-135M-Instruct's widths: 30 thin layers, launch-bound at PPO's micro-batches (session 22)
    "S": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}  # fmt: skip


def hh_prompts(limit: int) -> list[str]:
    """HH dialogues (``chosen``) cut right after their last ``Assistant:``."""
    out: list[str] = []
    with gzip.open(default_hh_file(), "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            cut = text.rfind("Assistant:")
            if cut > 0:
                out.append(text[: cut + len("Assistant:")])
            if len(out) >= limit:
                break
    return out


def prompt_batch(tok: Any, batch: int, max_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-truncate each prompt to ``max_prompt`` tokens, then left pad to the batch's widest."""
    rows = [tok(t, add_special_tokens=False).input_ids[-max_prompt:] for t in hh_prompts(batch)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / statistics.median(times)


def floor_bytes(model: torch.nn.Module, cfg: Any, batch: int, prompt: int, new: int) -> dict[str, float]:
    """Bytes every decode step must read: weights (no input embedding) + KV of the context so far."""
    emb = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.get_output_embeddings().weight is not emb:
        weights -= emb.numel() * emb.element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * emb.element_size()
    kv = sum(per_token * batch * (prompt + s) for s in range(new))
    return {"weight_bytes_per_step": weights, "kv_bytes_total": kv, "bytes_total": weights * new + kv}


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_backend(backend: Any, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                  device: torch.device, warmup: int, runs: int) -> dict[str, Any]:  # fmt: skip
    first = timed(lambda: backend.generate(ids, mask, params), device)
    for _ in range(warmup - 1):
        backend.generate(ids, mask, params)
    times = [timed(lambda: backend.generate(ids, mask, params), device) for _ in range(runs)]
    out = backend.generate(ids, mask, params)
    n_tokens = int(out.response_mask.sum())
    med = statistics.median(times)
    one = SamplingParams(max_new_tokens=1, temperature=params.temperature, ignore_eos=True)
    prefill = statistics.median(timed(lambda: backend.generate(ids, mask, one), device) for _ in range(3))
    return {
        "first_call_s": first,
        "times_s": times,
        "median_s": med,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / med,
        "prefill_plus_one_token_s": prefill,
        "decode_ms_per_step": 1e3 * (med - prefill) / max(params.max_new_tokens - 1, 1),
        "info": {k: v for k, v in out.info.items() if isinstance(v, (int, float, str))},
    }


@torch.no_grad()
def agreement(backend: Any, model: Any, ids: torch.Tensor, mask: torch.Tensor, args: Any) -> dict[str, float]:
    """Correctness on the device: greedy tokens vs HF ``generate`` (16 steps) and sampled log-probs vs
    the model's recomputation (:func:`rlhf_kit.logprobs.sequence_logprobs`)."""
    from rlhf_kit.logprobs import sequence_logprobs

    greedy = SamplingParams(max_new_tokens=16, greedy=True, ignore_eos=True)
    ref = HFBackend(model).generate(ids, mask, greedy).responses
    got = backend.generate(ids, mask, greedy).responses
    same_prefix = (ref == got).long().cumprod(1).sum(1).float()
    out = backend.generate(ids, mask, SamplingParams(max_new_tokens=32, temperature=1.0, seed=1))
    re = sequence_logprobs(model, out.sequences, out.attention_mask, out.prompt_length, temperature=1.0)
    diff = ((re - out.logprobs) * out.response_mask).abs()
    return {
        "greedy_rows_identical_16": float((same_prefix == 16).float().mean()),
        "greedy_mean_identical_prefix": float(same_prefix.mean()),
        "logprob_max_abs_diff": float(diff.max()),
        "logprob_mean_abs_diff": float(diff.sum() / out.response_mask.sum()),
    }


def profile_generate(backend: Any, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                     stem: str) -> dict[str, Any]:  # fmt: skip
    """One generate call under ``torch.profiler``: the top device-time rows to ``<stem>_profile.txt`` and
    the device-busy total (kernels inside replayed CUDA graphs included) in the result."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed(lambda: backend.generate(ids, mask, params), ids.device)
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    write_atomic(stem + "_profile.txt", table)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "device_busy_s": sum(e.self_device_time_total for e in events) / 1e6,
        "kernels": len(kernels),
        "kernels_per_step": len(kernels) / max(params.max_new_tokens, 1),
    }


def run_config(name: str, tok: Any, args: argparse.Namespace, device: torch.device, bw: float) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
        **CONFIGS[name],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    ids, mask = prompt_batch(tok, args.batch, args.prompt_len)
    ids, mask = ids.to(device), mask.to(device)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    fb = floor_bytes(model, cfg, args.batch, ids.shape[1], args.new_tokens)
    res: dict[str, Any] = {
        "config": name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "prompt_width": ids.shape[1],
        "new_tokens": args.new_tokens,
        "dtype": str(dtype),
        **fb,
        "floor_s": fb["bytes_total"] / bw if bw == bw else None,
        "backends": {},
    }
    max_seq = ids.shape[1] + args.new_tokens
    variants: list[tuple[str, Any]] = [("hf_eager", lambda: HFBackend(model, tok))]
    if device.type == "cuda":

        def compiled(**kw: Any) -> Any:
            return lambda: CompiledBackend(copy.deepcopy(model), args.batch, max_seq, True, True, **kw)

        def no_defer(make: Any) -> Any:
            def build() -> Any:
                saved = compiled_mod.defer_residuals
                compiled_mod.defer_residuals = lambda model: False
                try:
                    return make()
                finally:
                    compiled_mod.defer_residuals = saved

            return build

        variants += [
            (
                "compiled_graphs",
                compiled(),
            ),  # the defaults: compile_scope="blocks", decode_attention="auto" (the Triton kernel on CUDA)
            ("compiled_graphs_unfused", compiled(fuse=False)),
            (
                "compiled_graphs_nodefer",
                no_defer(compiled()),
            ),  # fused, each block's residual add its own kernel
            ("compiled_graphs_nopdl", compiled(compile_options={"options": {"triton.enable_pdl": False}})),
            ("compiled_graphs_chains2", compiled(decode_chains=2)),  # two half-batch chains on two streams
            ("compiled_graphs_chains4", compiled(decode_chains=4)),
            ("compiled_graphs_step", compiled(compile_scope="step")),
            ("compiled_graphs_matmul", compiled(decode_attention="matmul")),
            ("compiled_graphs_sdpa", compiled(decode_attention="sdpa")),
            ("compiled_graphs_autotune", compiled(compile_options={"mode": "max-autotune-no-cudagraphs"})),
            ("compiled_graphs_eager_prefill", compiled(compile_prefill=False)),
            # with --kernel-config's decode-kernel settings: the first is compiled_graphs_kernel_config, the
            # others compiled_graphs_kernel_config1, 2, ...
            *(
                (f"compiled_graphs_kernel_config{i or ''}", compiled())
                for i in range(len(args.kernel_config))
            ),
            ("eager_graphs", lambda: CompiledBackend(copy.deepcopy(model), args.batch, max_seq, False, True)),
        ]
    else:
        variants += [
            ("compiled_eager_cpu", lambda: CompiledBackend(copy.deepcopy(model), args.batch, max_seq))
        ]
    variants = [v for v in variants if not args.only or v[0] in args.only]
    for vname, make in variants:
        if vname in args.skip:
            continue
        decode_kernel.CONFIG = dict(DEFAULT_KERNEL)  # read when the decode step is traced and captured
        if vname.startswith("compiled_graphs_kernel_config"):
            decode_kernel.CONFIG.update(json.loads(args.kernel_config[int(vname[29:] or 0)]))
        print(f"[{name}] {vname} ...", flush=True)
        try:
            t0 = time.perf_counter()
            backend = make()
            r = bench_backend(backend, ids, mask, params, device, args.warmup, args.runs)
            r["wall_with_setup_s"] = time.perf_counter() - t0
            r.update(agreement(backend, model, ids, mask, args))
            r["decode_kernel_config"] = dict(decode_kernel.CONFIG)
            if args.profile and vname != "hf_eager":
                r["profile"] = profile_generate(
                    backend, ids, mask, params, os.path.join(args.out, f"{name}_{vname}")
                )
            if device.type == "cuda":
                r["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["backends"][vname] = r
            print(f"[{name}] {vname}: median {r['median_s']:.4f}s, {r['tokens_per_s']:.0f} tok/s, "
                  f"first call {r['first_call_s']:.1f}s, {r['info']}", flush=True)  # fmt: skip
            if hasattr(backend, "sleep"):
                backend.sleep()
            del backend
        except Exception as e:  # keep going: one failing variant must not lose the others' numbers
            res["backends"][vname] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            print(f"[{name}] {vname} FAILED: {e}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hf = res["backends"].get("hf_eager", {}).get("median_s")
    for r in res["backends"].values():
        if hf and "median_s" in r:
            r["speedup_vs_hf"] = hf / r["median_s"]
    return res


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Device: {results['device']}; torch {results['torch']}, transformers {results['transformers']}; "
        f"copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s (read + write).",
        "",
        "| config | params | backend | median s | tokens/s | speedup vs HF | decode ms/step | prefill+1 s | "
        "first call s | floor s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        floor = f"{c['floor_s']:.4f}" if c.get("floor_s") else "n/a"
        for name, r in c["backends"].items():
            if "error" in r:
                lines.append(f"| {c['config']} | {c['params'] / 1e6:.0f}M | {name} | failed: {r['error'][:80]} "
                             "| | | | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {c['config']} | {c['params'] / 1e6:.0f}M | {name} | {r['median_s']:.4f} | "
                f"{r['tokens_per_s']:.0f} | {r.get('speedup_vs_hf', 1.0):.1f}x | {r['decode_ms_per_step']:.2f} | "
                f"{r['prefill_plus_one_token_s']:.4f} | {r['first_call_s']:.1f} | {floor} |"
            )
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=None, help="A, 1B (default) or tiny")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, batch 4 x 16 tokens")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip", nargs="*", default=[], help="backend variants to skip")
    ap.add_argument("--only", nargs="*", default=[], help="run only these backend variants")
    ap.add_argument("--profile", action="store_true", help="one profiled generate per compiled variant")
    ap.add_argument("--no-cudnn", action="store_true", help="SDPA without cuDNN (as the recipes run)")
    ap.add_argument(
        "--kernel-config",
        nargs="+",
        default=["{}"],
        help="variants compiled_graphs_kernel_config[N]: one JSON over decode_kernel.CONFIG each",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.configs = args.configs or ["tiny"]
        args.batch, args.prompt_len, args.new_tokens, args.warmup, args.runs = 4, 32, 16, 1, 2
    configs = args.configs or ["A", "1B"]
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.enable_cudnn_sdp(not args.no_cudnn)
    import transformers

    t0 = time.perf_counter()
    tok = train_tokenizer(vocab_size=512 if args.tiny else 8192, padding_side="left")
    print(f"tokenizer: {len(tok)} tokens in {time.perf_counter() - t0:.1f}s", flush=True)
    bw = copy_bandwidth(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "copy_bandwidth_GBps": bw / 1e9 if bw == bw else float("nan"),
        "cudnn_sdpa": not args.no_cudnn,
        "command": " ".join(["python", "bench/generation.py", *(argv if argv is not None else sys.argv[1:])]),
        "configs": [],
    }
    for name in configs:
        results["configs"].append(run_config(name, tok, args, device, bw))
        write_atomic(os.path.join(args.out, "generation.json"), json.dumps(results, indent=1))
        write_atomic(os.path.join(args.out, "generation.md"), markdown(results))
    print(markdown(results), flush=True)
    return results


if __name__ == "__main__":
    main()
