"""A random-init twin of a checkpoint: its config and tokenizer, fresh weights, saved as a HF directory.

    python bench/shape_twin.py <dir with config.json + tokenizer files> <output dir> [--dtype bfloat16]

Speed and memory depend on shapes, dtypes and token lengths, not on weight values, so a speed run can
use the twin where the real weights are too large to carry in one call. Accuracy needs the real weights.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("output_dir")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(args.source).save_pretrained(args.output_dir)
    print(
        f"wrote {args.output_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random parameters"
    )


if __name__ == "__main__":
    main()
