"""A decode step's projections alone, on the GPU: ``F.linear`` of a few rows (the decode batch) through
cuBLAS, through cuBLASLt, and through a skinny Triton product at several tile settings.

At 64 rows a decode step's four products read 4-46 MB of weights each, and the profile (docs/benchmarks.md,
session 18) has the small ones (QKV and output) at about half the copy bandwidth. This measures each
product alone: every variant runs once per layer (``LAYERS`` weight copies, more than the L2 cache
holds) inside a CUDA graph, replayed ``--replays`` times; time per call and the bandwidth on the weight
bytes, with the copy bandwidth of the same process. Every Triton setting is checked against cuBLAS first.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode_attention import LAYERS, timed  # noqa: E402  (16 calls per graph, one per layer)
from bench.generation import CONFIGS, copy_bandwidth  # noqa: E402
from rlhf_kit.generation import skinny_gemm  # noqa: E402


def shapes(config: str) -> dict[str, tuple[int, int]]:
    """``name -> (N, K)`` of one decode block's four products (QKV and gate/up stacked)."""
    c = CONFIGS[config]
    d, heads, kv, inter = (
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["intermediate_size"],
    )
    head = d // heads
    return {"qkv": (d + 2 * kv * head, d), "o": (d, d), "gate_up": (2 * inter, d), "down": (d, inter)}


def settings(args: argparse.Namespace, k: int) -> list[dict]:
    """Every Triton launch setting of the sweep that splits ``K`` evenly."""
    out = []
    for bn, bk, sk, nw, st in itertools.product(
        args.block_n, args.block_k, args.split_k, args.warps, args.stages
    ):
        if k % (sk * bk) == 0:
            out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "num_stages": st})
    return out


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, -1)
    return F.silu(gate) * up


def checked_time(fn, want: torch.Tensor, replays: int) -> float | str:
    """Seconds per call of ``fn(layer)``, or why not: its layer-0 output off ``want`` by more than 0.05
    (max abs), or the error of a setting that does not compile."""
    try:
        err = float((fn(0).float() - want).abs().max())
        return f"wrong: max abs {err:.3g}" if err > 0.05 else timed(fn, replays)
    except Exception as e:  # noqa: BLE001 -- a setting that does not compile
        return f"error: {type(e).__name__}: {str(e)[:120]}"


def measure(x: torch.Tensor, ws: list[torch.Tensor], args: argparse.Namespace, glu: bool = False) -> dict:
    """``variant -> seconds per call`` (or why it did not run) for ``x @ w.T`` over the layers' weights;
    ``glu``: also ``silu(gate) * up`` after cuBLAS (eager, three more kernels) and the Triton GLU pass."""
    out: dict = {}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        out[lib] = timed(lambda i: F.linear(x, ws[i]), args.replays)
    torch.backends.cuda.preferred_blas_library("cublas")
    if glu:
        out["cublas_silu_mul"] = timed(lambda i: silu_mul(F.linear(x, ws[i])), args.replays)
        want_glu = silu_mul(F.linear(x.float(), ws[0].float()))
        for cfg in settings(args, x.shape[1]):
            if cfg["SPLIT_K"] == 1:  # the GLU pass never splits K
                label = "glu_n{BLOCK_N}_k{BLOCK_K}_w{num_warps}_st{num_stages}".format(**cfg)
                fn = lambda i, c=cfg: skinny_gemm.linear(x, ws[i], config=c, glu=True)  # noqa: E731
                out[label] = checked_time(fn, want_glu, args.replays)
    want = F.linear(x, ws[0]).float()
    for cfg in settings(args, x.shape[1]):
        label = "triton_n{BLOCK_N}_k{BLOCK_K}_s{SPLIT_K}_w{num_warps}_st{num_stages}".format(**cfg)
        fn = lambda i, c=cfg: skinny_gemm.linear(x, ws[i], config=c)  # noqa: E731
        out[label] = checked_time(fn, want, args.replays)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["A", "1B"])
    ap.add_argument("--rows", nargs="+", type=int, default=[64])
    ap.add_argument("--block-n", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--block-k", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--split-k", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--warps", nargs="+", type=int, default=[4])
    ap.add_argument("--stages", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--out", default="decode_gemm.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows_out = []
    for config in args.configs:
        for name, (n, k) in shapes(config).items():
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(LAYERS)]
            for m in args.rows:
                variants = measure(
                    torch.randn(m, k, device=dev, dtype=torch.bfloat16), ws, args, name == "gate_up"
                )
                times = {v: t for v, t in variants.items() if isinstance(t, float)}
                plain = [v for v in times if not v.startswith(("glu", "cublas_silu"))]
                best = min(plain, key=times.get)
                gbps = {v: n * k * 2 / t / 1e9 for v, t in times.items()}
                rows_out.append({"config": config, "product": name, "n": n, "k": k, "rows": m,
                                 "variants": variants, "best": best, "gbps": gbps})  # fmt: skip
                print(f"{config} {name} n={n} k={k} rows={m}: cublas {times['cublas'] * 1e6:.1f} us "
                      f"({gbps['cublas']:.0f} GB/s), cublaslt {times['cublaslt'] * 1e6:.1f} us "
                      f"({gbps['cublaslt']:.0f} GB/s), best {best} {times[best] * 1e6:.1f} us ({gbps[best]:.0f} GB/s)",
                      flush=True)  # fmt: skip
                if name == "gate_up":
                    glus = {v: t for v, t in times.items() if v.startswith("glu")}
                    g = min(glus, key=glus.get) if glus else None
                    print(f"  + silu*mul: cublas {times['cublas_silu_mul'] * 1e6:.1f} us, best GLU pass {g} "
                          f"{glus[g] * 1e6 if g else float('nan'):.1f} us", flush=True)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"copy_bandwidth": bw, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
