"""GPU check of ``--generation-cache``: a kept CUDA graph samples what a fresh capture samples, and what
the re-capture costs. CUDA only (no graphs on CPU).

CompiledBackend warms its decode step up before capturing it, and the warm-up samples. The capture now
restores the CUDA generator afterwards, so with the same seed a call that captures and a call that
replays a kept graph must draw the same tokens; before, the first call's warm-up moved the generator
and the two differed. Times: a generate call that replays the kept graph against one after ``sleep()``
(KV cache and graphs released, so the call allocates and captures again), as a PPO step pays it.

    python3 bench/cache_check.py --config A --out $OUT/cache_check.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import environment, llama_config, write_json
from bench.generation import prompt_batch
from rlhf_kit.generation import CompiledBackend, SamplingParams
from rlhf_kit.tiny import train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="A", choices=["A", "B", "tiny"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda")
    tok = train_tokenizer(vocab_size=8192)
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(llama_config(args.config, tok), dtype=torch.bfloat16).eval()
    ids, mask = prompt_batch(tok, args.batch, 128)
    ids, mask = ids.to(dev), mask.to(dev)
    backend = CompiledBackend(
        model, max_batch_size=args.batch, max_seq_len=128 + args.new_tokens, tokenizer=tok
    )
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)

    def sample(release_first: bool) -> tuple[torch.Tensor, float]:
        if release_first:
            backend.sleep()
        torch.manual_seed(1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = backend.generate(ids, mask, params)
        torch.cuda.synchronize()
        return out.sequences, time.perf_counter() - t

    first, first_s = sample(False)  # compiles and captures
    kept, _ = sample(False)  # replays the kept graph
    recaptured, _ = sample(True)  # released, captured again
    kept_s = statistics.median(sample(False)[1] for _ in range(args.runs))
    released_s = statistics.median(sample(True)[1] for _ in range(args.runs))
    result = {
        "env": environment(),
        "config": args.config,
        "first_call_s": first_s,
        "kept_equals_first_capture": bool(torch.equal(first, kept)),
        "recaptured_equals_first_capture": bool(torch.equal(first, recaptured)),
        "generate_kept_s": kept_s,
        "generate_after_release_s": released_s,
        "kv_cache_gib": backend.kv_cache_bytes() / 2**30,
    }
    print(result, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
