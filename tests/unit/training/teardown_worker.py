"""A 2-process accelerate run (DDP over gloo) that ends its process group as the recipes do; launched by
tests/unit/training/test_dist.py under torchrun. ``old`` ends the group while the wrapped model is alive
(the recipes before end_process_group), ``new`` through rlhf_kit.training.dist.end_process_group."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from torch import nn

from rlhf_kit.training.dist import end_process_group


def main(mode: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert accelerator.num_processes == 2, accelerator.num_processes
    for _ in range(4):
        loss = model(torch.randn(8, 32)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    total = accelerator.reduce(loss.detach(), reduction="mean")
    assert torch.isfinite(total)
    if mode == "old":
        accelerator.end_training()  # the model (its DDP reducer) is freed when main returns
    else:
        del model
        end_process_group(accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
