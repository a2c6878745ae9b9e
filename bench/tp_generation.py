"""TP=N generation from the FSDP2 training layout (issue 8), on N GPUs in one torchrun job.

Every rank: a config-A-width Llama (random init, fp32) is sharded with FSDP2 and takes one SGD step, so
the training weights differ from the saved ones; the weights stream (``iter_full_params``) into an HF
tensor-parallel model (``tp_plan="auto"``, TP over all ranks) through ``HFBackend.update_weights``.
Rank 0 also loads the same stream into a plain single-GPU model. Both generate greedily from the same
HH prompts; the script reports the fraction of rows whose tokens are equal, and the time of each.

    torchrun --nproc_per_node 2 bench/tp_generation.py --out $OUT/tp_generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tp_generation.json")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--work", default="/tmp/tp_work")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_kit.data import PromptCollator
    from rlhf_kit.generation import HFBackend, SamplingParams
    from rlhf_kit.generation.resharding import iter_full_params
    from rlhf_kit.tiny import hh_texts, train_tokenizer
    from rlhf_kit.training.fsdp import apply_fsdp2

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tok = train_tokenizer(vocab_size=8192)
    path = os.path.join(args.work, "init")
    if rank == 0:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, num_hidden_layers=args.layers, num_attention_heads=16,
                          num_key_value_heads=8, intermediate_size=2816, max_position_embeddings=2048,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)  # fmt: skip
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    dist.barrier()

    # training layout: FSDP2 shards, one SGD step
    trained = apply_fsdp2(AutoModelForCausalLM.from_pretrained(path).to(device))
    ids = torch.randint(3, len(tok), (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    trained(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    torch.optim.SGD(trained.parameters(), lr=1e-2).step()

    # inference layout: HF tensor parallel over all ranks, refit from the training stream
    tp = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    t0 = time.perf_counter()
    n = HFBackend(tp).update_weights(iter_full_params(trained))
    refit_s = time.perf_counter() - t0

    prompts = [tok(t).input_ids[-args.prompt_len :] for t in hh_texts(args.batch)]
    batch = PromptCollator(tok.pad_token_id)(prompts)
    prompt, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    params = SamplingParams(max_new_tokens=args.new_tokens, greedy=True, ignore_eos=True,
                            pad_token_id=tok.pad_token_id)  # fmt: skip

    def timed(backend):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = backend.generate(prompt, mask, params).sequences
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    got, tp_s = timed(HFBackend(tp))
    result = {"world": world, "params_refit": n, "refit_s": refit_s, "tp_generate_s": tp_s}
    full = dict(iter_full_params(trained))  # collective: every rank joins
    if rank == 0:
        single = AutoModelForCausalLM.from_pretrained(path).to(device)
        single.load_state_dict(full)
        want, single_s = timed(HFBackend(single))
        rows_equal = (got == want).all(-1).float().mean().item()
        result.update(single_generate_s=single_s, rows_equal=rows_equal,
                      tokens_equal=(got == want).float().mean().item(), device=str(torch.cuda.get_device_name(0) if cuda else "cpu"))  # fmt: skip
        print(json.dumps(result), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
