"""GPU check of --optimizer adamw8bit's state: bytes per parameter, and an exact offload round trip.

``rlhf_kit.training.offload`` moves optimizer state to the host during generation (``--offload-optimizer``);
the 8-bit moments (uint8 codes and fp32 block scales) must come back exactly as they left. On CPU the
move is a no-op, so this runs where a CUDA device exists:

    python3 bench/lowbit_check.py --out $OUT/lowbit_check.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from rlhf_kit.training.lowbit import build_8bit_optimizer
from rlhf_kit.training.offload import offload_optimizer_state, onload_optimizer_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=4096)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(args.width, args.width), nn.Linear(args.width, args.width)).to(dev)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_8bit_optimizer(a, 1e-4), build_8bit_optimizer(b, 1e-4)
    x = torch.randn(64, args.width, device=dev, dtype=torch.bfloat16)

    def step(model, opt, seed):
        torch.manual_seed(seed)  # the stochastic rounding draws from the CUDA generator
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(a, opt_a, 1)
    step(b, opt_b, 1)
    w = a[0].weight
    state_bytes = sum(t.nbytes for k, t in opt_a.state[w].items() if k != "step")  # codes and scales
    offload_optimizer_state(opt_b)  # what --offload-optimizer does around generation
    moved = opt_b.state[b[0].weight]["exp_avg"]
    on_host = {"dtype": str(moved.dtype), "device": str(moved.device), "pinned": moved.is_pinned()}
    before = torch.cuda.memory_allocated(dev)
    onload_optimizer_state(opt_b, dev)
    step(a, opt_a, 2)
    step(b, opt_b, 2)
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev),
        "moment_bytes_per_param": state_bytes / w.numel(),
        "offloaded_state": on_host,
        "allocated_while_offloaded_gib": before / 2**30,
        "offload_round_trip_exact": all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())),
    }
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
