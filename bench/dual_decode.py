"""Would two half-batch decode chains on two CUDA streams beat one full-batch chain? (a feasibility probe)

At a decode batch of 64 every product of a small model is bound by its fixed cost per kernel (a few
microseconds for a few MB, docs/benchmarks.md), not by the bytes it streams: the card is mostly idle. Two
independent chains of 32 rows each, one per stream, could fill each other's gaps. This probe times the
captured decode step's CUDA graph replayed ``--steps`` times:

* ``full``: one backend, bucket 64 (what generation runs today);
* ``half``: one backend, bucket 32 (half the rows, the same kernels);
* ``halves_serial``: two backends of 32 rows, their graphs alternating on one stream;
* ``halves_parallel``: the same two graphs, each on its own stream.

Each backend generates once first (prefill, capture); before each timed loop the cache position and step
counter are set back to the end of the prompt, so every loop writes the same slots. The tokens sampled in
the loops are not used. GPU only::

    python3 bench/dual_decode.py --configs A 1B --out $OUT/dual
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generation import CONFIGS, prompt_batch  # noqa: E402

from rlhf_kit.generation import CompiledBackend, SamplingParams  # noqa: E402
from rlhf_kit.tiny import train_tokenizer  # noqa: E402


def _rewind(backend: CompiledBackend, b: int, p: int) -> None:
    backend._state.cache_pos.fill_(p)
    backend._bufs[b].step.fill_(1)
    backend._bufs[b].pos.fill_(p)


def _time(loops: list[tuple[Any, Any]], steps: int, rewind: Any, reps: int) -> float:
    """Median seconds of ``steps`` replays of every (graph, stream) in ``loops``, interleaved."""
    times = []
    for _ in range(reps):
        rewind()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        main = torch.cuda.current_stream()
        for _, stream in loops:
            stream.wait_stream(main)
        for _ in range(steps):
            for graph, stream in loops:
                with torch.cuda.stream(stream):
                    graph.replay()
        for _, stream in loops:
            main.wait_stream(stream)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(name: str, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
                      **CONFIGS[name])  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    ids, mask = (t.cuda() for t in prompt_batch(tok, args.batch, args.prompt_len))
    params = SamplingParams(max_new_tokens=args.steps + 1, temperature=1.0, ignore_eos=True, seed=0)
    max_seq = ids.shape[1] + args.steps + 1
    half = args.batch // 2

    def make(b: int) -> CompiledBackend:
        return CompiledBackend(copy.deepcopy(model), b, max_seq, True, True)

    full, h1, h2 = make(args.batch), make(half), make(half)
    widths = [
        backend.generate(i, m, params).info["prefill_width"]  # the cache slot the first decode step writes
        for backend, i, m in ((full, ids, mask), (h1, ids[:half], mask[:half]), (h2, ids[half:], mask[half:]))
    ]

    def graph(backend: CompiledBackend, b: int) -> Any:
        return next(g for (bb, _), g in backend._graphs.items() if bb == b)

    def rewind_all() -> None:
        for backend, b, width in zip((full, h1, h2), (args.batch, half, half), widths):
            _rewind(backend, b, width)

    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    g_full, g1, g2 = graph(full, args.batch), graph(h1, half), graph(h2, half)
    out = {
        "config": name,
        "steps": args.steps,
        "full": _time([(g_full, s1)], args.steps, rewind_all, args.reps),
        "half": _time([(g1, s1)], args.steps, rewind_all, args.reps),
        "halves_serial": _time([(g1, s1), (g2, s1)], args.steps, rewind_all, args.reps),
        "halves_parallel": _time([(g1, s1), (g2, s2)], args.steps, rewind_all, args.reps),
        "full_again": _time([(g_full, s1)], args.steps, rewind_all, args.reps),
    }
    out["parallel_over_full"] = out["halves_parallel"] / out["full"]
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["A", "1B"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=127)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    tok = train_tokenizer(vocab_size=8192, padding_side="left")
    results = [run(name, tok, args) for name in args.configs]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dual_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
