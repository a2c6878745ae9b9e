"""How far FP8 products move a real model's log-probs and gradients (rlhf_kit.models.fp8, torchao's recipes).

    python bench/fp8_fidelity.py --model /path/to/SmolLM2-135M-Instruct [--pairs 32 --max-length 192]

On the chosen responses of the shipped HH pairs, against the same model in fp32:

* per-token log-probs of the bf16 model, of our ``--fp8-backward`` settings (the forward unchanged, so
  their log-probs are the bf16 ones), and of torchao's FP8 training recipes ``tensorwise`` and
  ``rowwise`` (every product in FP8, forward included): mean and largest absolute difference, in nats;
* the gradients of the language-model loss for every linear layer inside the transformer blocks:
  relative L2 error (mean and largest over layers) and the smallest cosine similarity.

The LM head is left in bf16 in every FP8 variant (as :func:`rlhf_kit.models.fp8.convert_to_fp8_backward`
does). Runs on the CPU (torch's ``_scaled_mm`` does FP8 there) or a GPU; writes ``fp8_fidelity.json`` and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402


def hh_chosen(n: int) -> list[str]:
    """The chosen side of the first ``n`` shipped HH test pairs."""
    from rlhf_kit.tiny import hh_texts

    return hh_texts(2 * n)[::2]  # chosen, rejected, chosen, ...


def lm_pass(model, ids: torch.Tensor, mask: torch.Tensor):
    """Per-token log-probs of ``ids[:, 1:]`` (float32) and the block linears' gradients of the mean LM loss
    over the real tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    (-logp[mask[:, 1:].bool()].mean()).backward()
    grads = {
        n: p.grad.float() for n, p in model.named_parameters() if "layers." in n and n.endswith("proj.weight")
    }
    return logp.detach(), grads


def compare(logp, ref_logp, real, grads, ref_grads) -> dict:
    d = (logp - ref_logp)[real].abs()
    rel = [float((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()) for k in ref_grads]
    cos = [
        float(torch.nn.functional.cosine_similarity(grads[k].flatten(), ref_grads[k].flatten(), 0))
        for k in ref_grads
    ]
    return {
        "logprob_mean_abs_nats": float(d.mean()),
        "logprob_max_abs_nats": float(d.max()),
        "grad_rel_err_mean": sum(rel) / len(rel),
        "grad_rel_err_max": max(rel),
        "grad_cos_min": min(cos),
        "layers": len(rel),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="an HF causal-LM directory (e.g. bench/gguf_to_hf.py's output)"
    )
    ap.add_argument(
        "--pairs", type=int, default=32, help="HH dialogues (the chosen side of the first N pairs)"
    )
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_kit.models.fp8 import convert_to_fp8_backward

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(
        hh_chosen(args.pairs), return_tensors="pt", padding=True, truncation=True, max_length=args.max_length
    )
    ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
    real = mask[:, 1:].bool()

    def load(dtype):
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()

    ref_logp, ref_grads = lm_pass(load(torch.float32), ids, mask)
    bf16 = load(torch.bfloat16)

    def every_product(model, recipe: str) -> None:  # torchao's training recipes: the forward in FP8 too
        cfg = Float8LinearConfig.from_recipe_name(recipe)
        convert_to_float8_training(model, config=cfg, module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)

    variants = {  # each converts a copy of the bf16 model in place
        "bf16": lambda m: None,
        "fp8 backward: weights": lambda m: convert_to_fp8_backward(m, "weights"),
        "fp8 backward: all": lambda m: convert_to_fp8_backward(m, "all"),
        "fp8 every product (torchao tensorwise)": lambda m: every_product(m, "tensorwise"),
        "fp8 every product (torchao rowwise)": lambda m: every_product(m, "rowwise"),
    }
    results = {"model": args.model, "device": args.device, "torch": torch.__version__, "pairs": args.pairs,
               "tokens": int(real.sum()), "max_length": args.max_length, "variants": {}}  # fmt: skip
    for name, convert in variants.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(bf16)
        convert(model)
        logp, g = lm_pass(model, ids, mask)
        results["variants"][name] = compare(logp, ref_logp, real, g, ref_grads) | {
            "seconds": time.perf_counter() - t0
        }
        print(name, results["variants"][name], flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "fp8_fidelity.json"), results)
    print(f"\n{results['tokens']} tokens of {args.pairs} HH dialogues, against fp32, on {args.device}\n")
    print(
        "| variant | log-prob mean / max abs diff (nats) | gradient rel. L2 error mean / max | smallest cosine |"
    )
    print("|---|---|---|---|")
    for name, r in results["variants"].items():
        print(f"| {name} | {r['logprob_mean_abs_nats']:.4f} / {r['logprob_max_abs_nats']:.3f} | "
              f"{r['grad_rel_err_mean']:.4f} / {r['grad_rel_err_max']:.4f} | {r['grad_cos_min']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
