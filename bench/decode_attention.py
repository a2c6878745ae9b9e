"""A decode step's attention alone, on the GPU: the Triton kernel (rlhf_kit.generation.decode_kernel) at
several launch settings and product modes (``decode_kernel.MODES``) against the ``"matmul"`` path (two cache writes and grouped_decode_attention).

Shapes of the generation benchmark: batch 64, 8 KV heads, head size 64, 256 cache slots; query heads per
KV head 2 (config A) and 4 (1B). Each variant runs 16 times (one per layer, each on its own cache) inside a CUDA graph, replayed
``--replays`` times; the time per call and the bandwidth it reaches on the K/V bytes it must read
(slots before ``pos``) are reported, with the copy bandwidth measured in the same process.

    python3 bench/decode_attention.py --out $OUT/decode_attention.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.generation import copy_bandwidth  # noqa: E402
from rlhf_kit.generation import decode_kernel  # noqa: E402
from rlhf_kit.generation.static_cache import grouped_decode_attention  # noqa: E402

LAYERS = 16  # calls per captured graph, each on its own cache (as the layers of a decode step)


def timed(fn, replays: int) -> float:
    """Seconds per call of ``fn(layer)`` (``LAYERS`` calls captured in one CUDA graph)."""
    for layer in range(LAYERS):
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            fn(layer)
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / replays / LAYERS


def measure(
    device: torch.device, g: int, pos: int, configs: list[dict], replays: int, b: int = 64
) -> list[dict]:
    """Rows of one shape (``g`` query heads per KV head, write slot ``pos``): matmul, then each setting."""
    kv, d, slots = 8, 64, 256
    q = torch.randn(b, kv, g, d, device=device, dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(b, kv, 1, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    # one cache per layer: 16 x 34 MB, more than the L2 cache holds, so every call reads from memory
    caches = [
        [torch.randn(b, kv, slots, d, device=device, dtype=torch.bfloat16) for _ in range(2)]
        for _ in range(LAYERS)
    ]
    k_cache, v_cache = caches[0]
    mask = torch.zeros(b, 1, 1, slots, device=device, dtype=torch.bfloat16)
    mask[..., pos + 1 :] = torch.finfo(torch.bfloat16).min
    where = torch.tensor([pos], device=device)
    need = 2 * b * kv * pos * d * 2  # K and V bytes before pos
    rows = []

    def matmul(layer: int = 0) -> None:
        k, v = caches[layer]
        k.index_copy_(2, where, k_new)
        v.index_copy_(2, where, v_new)
        grouped_decode_attention(q, k, v, mask, 0.125, "matmul")

    def triton(layer: int = 0) -> torch.Tensor:
        k, v = caches[layer]
        return decode_kernel.decode_attention(q, k_new, v_new, k, v, mask, where, 0.125)

    matmul()
    ref = grouped_decode_attention(q, k_cache, v_cache, mask, 0.125, "matmul").float()
    t = timed(matmul, replays)
    rows.append({"g": g, "pos": pos, "variant": "matmul", "us": t * 1e6, "GBps": need / t / 1e9})
    for cfg in configs:
        decode_kernel.CONFIG = cfg
        try:
            err = triton().float().sub(ref).abs().max().item()
            t = timed(triton, replays)
        except Exception as e:  # a setting the compiler refuses (e.g. out of shared memory)
            rows.append({"g": g, "pos": pos, "variant": "triton", **cfg, "error": str(e)[:200]})
            continue
        row = {"g": g, "pos": pos, "variant": "triton", **cfg, "us": t * 1e6, "GBps": need / t / 1e9}
        rows.append({**row, "max_abs_err_vs_matmul": err})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="decode_attention.json")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64, help="rows (sequences) per call")
    ap.add_argument("--modes", nargs="+", default=list(decode_kernel.MODES), help="product modes to sweep")
    ap.add_argument("--blocks", nargs="+", type=int, default=[32, 64, 128], help="slots per loop iteration")
    ap.add_argument("--pos", nargs="+", type=int, default=[192, 255], help="write slots (context lengths)")
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    results = {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_GBps": bw / 1e9,
        "batch": args.batch,
        "rows": [],
    }
    configs = [
        {"BLOCK_N": n, "num_warps": w, "num_stages": s, "MODE": m}
        for m, n, w, s in itertools.product(args.modes, args.blocks, (2, 4), (1, 3))
    ]
    default = dict(decode_kernel.CONFIG)
    shapes = list(itertools.product((2, 4), args.pos))
    for g, pos in shapes:
        results["rows"] += measure(device, g, pos, configs, args.replays, args.batch)
    for g, pos in shapes:
        rows = [r for r in results["rows"] if r["g"] == g and r["pos"] == pos and "us" in r]
        best = sorted(rows, key=lambda r: r["us"])[:4]
        print(f"g={g} pos={pos}: " + "; ".join(
            f"{r['variant']} {r.get('MODE', '')}/{r.get('BLOCK_N', '')}/{r.get('num_warps', '')}/{r.get('num_stages', '')} "
            f"{r['us']:.1f} us {r['GBps']:.0f} GB/s" for r in best
        ) + f"; matmul {next(r['us'] for r in rows if r['variant'] == 'matmul'):.1f} us; "
            f"default {next(r['us'] for r in rows if all(r.get(k) == v for k, v in default.items())):.1f} us")  # fmt: skip
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
