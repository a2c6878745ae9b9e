"""A decode step's projections alone, on the GPU: the Triton kernel (rlhf_kit.generation.decode_gemm) at
several launch settings against ``F.linear`` (cuBLAS).

Shapes: 64 rows against the QKV, output, gate/up and down weights of the bench configs A and 1B
(bench/generation.py). Each product follows a small Triton kernel that writes its input, as a norm or the
SiLU-mul does in a decode step (launched with PDL and releasing its dependents after its loads, as
Inductor's kernels are under ``triton.enable_pdl``), so the weight prefetch has a kernel to hide under.
``LAYERS`` such pairs, each on its own weight (more bytes than the L2 cache holds), are captured in one CUDA
graph and replayed; the time per product is the pair's time less the input kernel's alone, and the
bandwidth is the weight bytes over that time, with the copy bandwidth measured in the same process.

    python3 bench/decode_gemm.py --out $OUT/decode_gemm.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.generation import CONFIGS, copy_bandwidth  # noqa: E402
from rlhf_kit.generation import decode_gemm  # noqa: E402


@triton.jit
def _input_kernel(src, dst, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """dst = src * 1.001: a stand-in for the norm before a projection."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        tl.extra.cuda.gdc_wait()
    v = tl.load(src + offs, mask=offs < n)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(dst + offs, v * 1.001, mask=offs < n)


def shapes(config: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a bench config."""
    c = CONFIGS[config]
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}


def timed(fn, layers: int, replays: int) -> float:
    """Seconds per replay of ``fn(layer)`` for every layer, captured in one CUDA graph."""
    for layer in range(layers):
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            fn(layer)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / replays


def measure(device, name: str, n: int, k: int, rows: int, configs: list[dict], replays: int) -> list[dict]:
    bytes_w = n * k * 2
    layers = max(8, int(2 * 60e6 // bytes_w) + 1)  # about 120 MB of weights per replay: past the 50 MB L2
    ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    src = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    xs = [torch.empty_like(src) for _ in range(layers)]

    def pre(layer: int) -> None:
        _input_kernel[(triton.cdiv(src.numel(), 1024),)](src, xs[layer], src.numel(), BLOCK=1024, PDL=True,
                                                         launch_pdl=True)  # fmt: skip

    t_pre = timed(pre, layers, replays)
    ref = F.linear(src, ws[0]).float()
    out = []

    def cublas(layer: int) -> None:
        pre(layer)
        F.linear(xs[layer], ws[layer])

    t = (timed(cublas, layers, replays) - t_pre) / layers
    base = {"shape": name, "rows": rows, "N": n, "K": k, "weight_MB": bytes_w / 1e6, "layers": layers}
    out.append({**base, "variant": "cublas", "us": t * 1e6, "GBps": bytes_w / t / 1e9})
    for cfg in configs:
        decode_gemm.CONFIG = dict(cfg)

        def ours(layer: int) -> None:
            pre(layer)
            decode_gemm.decode_linear(xs[layer], ws[layer])

        try:
            err = (decode_gemm.decode_linear(src, ws[0]).float() - ref).abs().max().item()
            t = (timed(ours, layers, replays) - t_pre) / layers
        except Exception as e:  # a setting the compiler refuses (e.g. out of registers or shared memory)
            out.append({**base, "variant": "triton", **cfg, "error": str(e)[:200]})
            continue
        out.append({**base, "variant": "triton", **cfg, "us": t * 1e6, "GBps": bytes_w / t / 1e9,
                    "max_abs_err_vs_cublas": err})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="decode_gemm.json")
    ap.add_argument("--configs", nargs="+", default=["A", "1B"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--bn", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--kc", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--waves", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--warps", nargs="+", type=int, default=[4])
    args = ap.parse_args()
    device = torch.device("cuda")
    decode_gemm.reserve(device)
    bw = copy_bandwidth(device)
    default = dict(decode_gemm.CONFIG)
    configs = [{**default, "BN": bn, "KC": kc, "WAVES": wv, "num_warps": w, "PDL": True}
               for bn, kc, wv, w in itertools.product(args.bn, args.kc, args.waves, args.warps)]  # fmt: skip
    configs += [{**default, "num_warps": 8}, {**default, "num_stages": 2}, {**default, "PDL": False}]
    configs = [c for i, c in enumerate(configs) if c not in configs[:i]]
    if default not in configs:
        configs.append(default)
    res = {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_GBps": bw / 1e9,
        "default": default,
        "rows": [],
    }
    for config in args.configs:
        for proj, (n, k) in shapes(config).items():
            rows = measure(device, f"{config}/{proj}", n, k, args.rows, configs, args.replays)
            res["rows"] += rows
            ok = [r for r in rows if "us" in r]
            best = sorted((r for r in ok if r["variant"] == "triton"), key=lambda r: r["us"])[:3]
            cub = next(r for r in ok if r["variant"] == "cublas")
            dflt = next(
                (
                    r
                    for r in ok
                    if r["variant"] == "triton" and all(r.get(a) == b for a, b in default.items())
                ),
                None,
            )
            print(f"{config}/{proj} N={n} K={k}: cublas {cub['us']:.2f} us ({cub['GBps']:.0f} GB/s); "
                  + (f"default {dflt['us']:.2f} us; " if dflt else "")
                  + "; ".join(f"{r['BN']}/{r['KC']}/{r['WAVES']}/{r['num_warps']}/{r['num_stages']}/{'pdl' if r['PDL'] else 'nopdl'} {r['us']:.2f} us "
                              f"({r['GBps']:.0f} GB/s, err {r['max_abs_err_vs_cublas']:.1e})" for r in best),
                  flush=True)  # fmt: skip
            decode_gemm.CONFIG = dict(default)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
