"""GPU probe for NaN in PPO training forwards/backwards on left-padded batches (issue 5).

Builds a random-init Llama (config A widths, 4 layers) and a PPO-shaped batch (left-padded prompts,
right-padded responses), then for every SDPA backend, with and without grad, counts non-finite values
in the per-token log-probs / values (real and padding positions apart) and in the gradients. Writes
one JSON line per case.

    python bench/nan_probe.py --out nan_probe.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_kit.logprobs import sequence_logprobs  # noqa: E402
from rlhf_kit.models.attention import padding_safe_sdpa  # noqa: E402
from rlhf_kit.models.heads import per_token_scores  # noqa: E402


def make_batch(vocab: int, b: int, p: int, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, p + n), generator=g)
    mask = torch.ones(b, p + n, dtype=torch.long)
    for i in range(b):
        lpad = int(torch.randint(0, p - 4, (1,), generator=g))
        rpad = int(torch.randint(0, n - 2, (1,), generator=g)) if i % 2 else 0
        mask[i, :lpad] = 0
        ids[i, :lpad] = 0
        if rpad:
            mask[i, p + n - rpad :] = 0
            ids[i, p + n - rpad :] = 0
    return ids.to(device), mask.to(device)


def count(x: torch.Tensor, where: torch.Tensor) -> int:
    return int((~torch.isfinite(x) & where).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="nan_probe.jsonl")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--tiny", action="store_true", help="hidden 64, vocab 512, 4 x 24 tokens (CPU smoke test)"
    )
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    dev = args.device
    width = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=512
    )
    if not args.tiny:  # config A widths
        width = dict(
            hidden_size=1024,
            num_attention_heads=16,
            num_key_value_heads=8,
            intermediate_size=2816,
            vocab_size=8192,
        )
    kw = dict(width, num_hidden_layers=args.layers, max_position_embeddings=2048, pad_token_id=0)
    lm = LlamaForCausalLM(LlamaConfig(**kw)).to(dev)
    critic = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **kw)).to(dev)
    print("attn_implementation", lm.config._attn_implementation, torch.__version__, flush=True)
    p, n, b = (16, 8, 4) if args.tiny else (128, 64, 16)
    ids, mask = make_batch(kw["vocab_size"], b, p, n, dev)
    resp_real = mask[:, p:].bool()
    all_real = mask.bool()
    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
        "padding_safe_sdpa": "safe",
    }
    out = open(args.out, "w")
    for name, be in backends.items():
        for grad in (False, True):
            for dtype in ("bf16_autocast",):
                rec = {"backend": name, "grad": grad, "dtype": dtype}
                try:
                    if be == "safe":
                        ctx = padding_safe_sdpa()
                    else:
                        ctx = sdpa_kernel([be]) if be is not None else contextlib.nullcontext()
                    lm.zero_grad(set_to_none=True)
                    critic.zero_grad(set_to_none=True)
                    with ctx, torch.autocast(dev, dtype=torch.bfloat16), torch.set_grad_enabled(grad):
                        lp, ent = sequence_logprobs(lm, ids, mask, p, 1.0, with_entropy=True)
                        vals = per_token_scores(critic, ids, mask)
                    rec["lp_nonfinite_real"] = count(lp, resp_real)
                    rec["lp_nonfinite_pad"] = count(lp, ~resp_real)
                    rec["ent_nonfinite_real"] = count(ent, resp_real)
                    rec["val_nonfinite_real"] = count(vals, all_real)
                    rec["val_nonfinite_pad"] = count(vals, ~all_real)
                    if grad:
                        m = resp_real.float()
                        loss = (
                            torch.where(resp_real, lp, 0).sum() + torch.where(all_real, vals, 0).sum()
                        ) / m.sum()
                        loss.backward()
                        bad = [
                            k
                            for k, v in list(lm.named_parameters()) + list(critic.named_parameters())
                            if v.grad is not None and not torch.isfinite(v.grad).all()
                        ]
                        rec["grad_nonfinite_params"] = len(bad)
                        rec["grad_nonfinite_first"] = bad[:3]
                except Exception as e:  # a backend may refuse the mask; record why
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(rec), flush=True)
                out.write(json.dumps(rec) + "\n")
    out.close()


if __name__ == "__main__":
    main()
