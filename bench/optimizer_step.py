"""One optimizer step over a bench model's parameters: ours (multi-tensor 8-bit AdamW, compiled and
eager), torchao's ``AdamW8bit`` (one compiled call per parameter), and fp32 master weights in fused
AdamW (the default on one GPU). Reports the median step (synchronised), the host time until ``step()``
returns, the state bytes per parameter, the peak memory the step adds, and how far ours lands from
torchao's when both round to nearest (same gradients, same start).

    python3 bench/optimizer_step.py --config B --out $OUT/optimizer_step.json     # GPU
    python3 bench/optimizer_step.py --config tiny --steps 3 --out /tmp/opt.json    # CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

from bench.common import environment, llama_config, sync, write_json
from rlhf_kit.tiny import train_tokenizer
from rlhf_kit.training.lowbit import build_8bit_optimizer
from rlhf_kit.training.optim import param_groups
from rlhf_kit.training.precision import build_master_weight_optimizer

VARIANTS = ("ours_compiled", "ours_eager", "torchao", "master_fused")


def build_model(cfg: Any, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def make_opt(name: str, model: torch.nn.Module, lr: float, stochastic: bool = True) -> torch.optim.Optimizer:
    if name.startswith("ours"):
        return build_8bit_optimizer(
            model, lr, 0.01, compile=name == "ours_compiled", stochastic_round=stochastic
        )
    if name == "torchao":
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit

        return TorchaoAdamW8bit(
            param_groups(model, 0.01), lr=lr, weight_decay=0.01, bf16_stochastic_round=stochastic
        )
    return build_master_weight_optimizer(model, lr, 0.01)


def set_grads(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """Fixed random gradients where the optimizer reads them (the masters for master weights)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    holders = list(getattr(opt, "master_weights", None) or [p for p in model.parameters() if p.requires_grad])
    for p in holders:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                total += v.codes.nbytes + v.scale.nbytes if hasattr(v, "codes") else v.nbytes
    masters = getattr(opt, "master_weights", None)
    return total + (sum(m.nbytes for m in masters) if masters is not None else 0)


def time_variant(name: str, cfg: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(cfg, device)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = make_opt(name, model, 1e-5)
    set_grads(model, opt, 0)
    sync(device)
    t = time.perf_counter()
    opt.step()  # state allocation, compilation
    sync(device)
    first = time.perf_counter() - t
    for _ in range(args.warmup):
        opt.step()
    sync(device)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    totals, hosts = [], []
    for _ in range(args.steps):
        sync(device)
        t = time.perf_counter()
        opt.step()
        hosts.append(time.perf_counter() - t)
        sync(device)
        totals.append(time.perf_counter() - t)
    extra = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else 0.0
    out = {
        "trained_params": n,
        "first_step_s": first,
        "median_step_s": statistics.median(totals),
        "median_host_s": statistics.median(hosts),
        "state_bytes_per_param": state_bytes(opt) / n,
        "step_peak_extra_gib": extra,
    }
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def agreement(cfg: Any, device: torch.device, steps: int) -> dict[str, float]:
    """Ours (compiled) against torchao, both rounding to nearest, on tensors torchao quantises (>= 4096
    values): the largest difference of the weights' total change, relative to its mean size."""
    runs = {}
    for name in ("ours_compiled", "torchao"):
        model = build_model(cfg, device)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = make_opt(name, model, 1e-4, stochastic=False)
        for s in range(steps):
            set_grads(model, opt, s)
            opt.step()
        runs[name] = {k: (v.detach().float() - start[k].float()) for k, v in model.named_parameters()}
        del model, opt
    worst, changed = 0.0, 0.0
    for k, ref in runs["torchao"].items():
        if ref.numel() >= 4096:
            scale = ref.abs().mean().item()
            worst = max(worst, (runs["ours_compiled"][k] - ref).abs().max().item() / scale)
            changed = max(changed, (runs["ours_compiled"][k] != ref).float().mean().item())
    return {"max_rel_diff": worst, "max_share_of_weights_differing": changed}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="B", choices=["A", "B", "tiny"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--agreement-steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = llama_config(args.config, train_tokenizer(vocab_size=8192))
    results: dict[str, Any] = {"env": environment(), "config": args.config, "variants": {}}
    for name in args.variants:
        results["variants"][name] = time_variant(name, cfg, device, args)
        print(name, results["variants"][name], flush=True)
    if {"ours_compiled", "torchao"} <= set(args.variants) and args.agreement_steps:
        results["agreement_vs_torchao"] = agreement(cfg, device, args.agreement_steps)
        print("agreement", results["agreement_vs_torchao"], flush=True)
    write_json(args.out, results)
    print("| variant | median step s | host s | first step s | state B/param | step extra GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results["variants"].items():
        print(f"| {name} | {r['median_step_s']:.4f} | {r['median_host_s']:.4f} | {r['first_step_s']:.1f} | "
              f"{r['state_bytes_per_param']:.2f} | {r['step_peak_extra_gib']:.2f} |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
