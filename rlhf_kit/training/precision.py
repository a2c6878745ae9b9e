"""bf16 compute weights with fp32 master weights held by the optimizer (one process).

Under ``torch.autocast`` with fp32 weights every linear re-casts its weight to bf16 on every call and
the residual stream, norms and elementwise ops run in fp32; on a 205M Llama that traffic was most of a
PPO training step (docs/benchmarks.md). Here the model itself holds bf16 parameters, and AdamW steps
fp32 copies (the master weights), as in mixed-precision training with a separate master copy
(Micikevicius et al., 2018, "Mixed Precision Training"):

* backward produces bf16 grads; at the end of each backward pass they are added into the fp32 masters'
  ``.grad`` (views of one flat buffer) and freed, so gradient accumulation over micro-batches happens in
  fp32 (:class:`_GradFold`);
* ``optimizer.step()`` updates the masters, then a step hook copies them into the bf16 parameters;
* the masters travel in ``optimizer.state_dict()`` (key ``"master_weights"``), so resume is exact.

Memory per trainable parameter: 2 (bf16 weight) + 4 (master) + 4 (fp32 grad) + 8 (AdamW) = 18 bytes,
against 16 for fp32 weights under autocast. For several processes use FSDP2's ``MixedPrecisionPolicy``
instead: the gradients move to the masters before DDP could reduce them.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_kit.training.optim import build_optimizer, param_groups

_KEY = "master_weights"


def build_master_weight_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    dtype: torch.dtype = torch.bfloat16,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """Cast ``model``'s trainable parameters to ``dtype`` and return an AdamW over fp32 copies of them.

    Same parameter groups as :func:`rlhf_kit.training.optim.build_optimizer` (no decay on biases and
    norms). Frozen parameters and buffers keep their dtype. The returned optimizer is a plain
    ``torch.optim.AdamW`` (schedulers, accelerate's wrapper and checkpointing work unchanged) with one
    extra attribute, ``master_weights``: an ``nn.ParameterList`` of the masters (in the order of
    ``model.parameters()``), which is where the gradients are (clip them there: :func:`grad_holder`).
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("build_master_weight_optimizer: no trainable parameters")
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
    master_groups = []
    for g in groups:
        masters = []
        for p in g["params"]:
            m = nn.Parameter(p.detach().to(torch.float32, copy=True))
            pairs.append((p, m))
            masters.append(m)
        master_groups.append({**g, "params": masters})
    opt = build_optimizer(master_groups, lr, weight_decay, betas, eps, fused)  # fused when on CUDA
    order = {id(p): i for i, p in enumerate(model.parameters())}
    pairs.sort(key=lambda pm: order[id(pm[0])])  # masters in the model's parameter order
    fold = _GradFold(pairs)
    for p, _ in pairs:
        p.data = p.data.to(dtype)
        p.register_post_accumulate_grad_hook(fold.hook)
    opt.master_weights = nn.ParameterList([m for _, m in pairs])
    params, masters = [p for p, _ in pairs], [m for _, m in pairs]

    @torch.no_grad()
    def copy_to_model(*_):
        torch._foreach_copy_(params, masters)

    def save_masters(_, state: dict) -> dict:
        state[_KEY] = [m.detach() for m in masters]
        return state

    def load_masters(_, state: dict) -> dict:
        state = dict(state)
        saved = state.pop(_KEY, None)
        if saved is None:
            raise KeyError(f"optimizer state has no {_KEY!r}: it was not saved by a master-weight optimizer")
        if len(saved) != len(masters):
            raise ValueError(f"{_KEY}: {len(saved)} saved tensors for {len(masters)} parameters")
        with torch.no_grad():
            for m, s in zip(masters, saved):
                m.copy_(s)
        copy_to_model()
        return state

    opt.register_step_post_hook(copy_to_model)
    opt.register_state_dict_post_hook(save_masters)
    opt.register_load_state_dict_pre_hook(load_masters)
    return opt


#: ``--optimizer`` choices: torch's AdamW (fused on CUDA), or 8-bit AdamW over bf16 weights (:mod:`.lowbit`).
OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    kind: str = "adamw",
    master_weights: bool = False,
    device: torch.device | str | None = None,
) -> torch.optim.Optimizer:
    """The recipes' one way to build a model's optimizer (no decay on biases and norms in every case).

    * ``kind="adamw8bit"``: bf16 weights, 8-bit moments (:func:`rlhf_kit.training.lowbit.build_8bit_optimizer`);
    * ``master_weights``: bf16 weights, fp32 masters in AdamW (:mod:`rlhf_kit.training.precision`); the
      model moves to ``device`` first, so the masters are made there;
    * otherwise AdamW over the model's own weights (fused when ``device`` is CUDA).
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    if kind == "adamw8bit":
        if master_weights:
            raise ValueError("adamw8bit keeps no fp32 master weights: drop master_weights")
        from rlhf_kit.training.lowbit import build_8bit_optimizer

        return build_8bit_optimizer(model, lr, weight_decay, betas)
    if master_weights:
        if device is not None:
            model.to(device)
        return build_master_weight_optimizer(model, lr, weight_decay, betas)
    return build_optimizer(model, lr, weight_decay, betas, device=device)


class _GradFold:
    """Moves the model's bf16 grads into the fp32 masters' grads once per backward pass.

    Each parameter's post-accumulate hook only queues :meth:`fold` (once) to run when the backward pass
    ends. The fold concatenates the grads into one flat fp32 buffer whose slices are the masters'
    ``.grad`` (later passes add their concatenation to it): a few kernels per backward, where a cast and
    an add per parameter (about 600 launches for config A's actor, each from a Python hook on the thread
    that issues the backward's kernels) kept the GPU waiting. Bit for bit the same sums: each bf16 grad
    is cast to fp32 exactly and added in fp32. The model's grads live until the end of the pass (2 bytes
    per parameter), and their concatenation takes as much while the fold runs.
    """

    def __init__(self, pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
        self.params = [p for p, _ in pairs]
        self.masters = [m for _, m in pairs]
        self.numel = sum(m.numel() for m in self.masters)
        self.queued = False

    def hook(self, _: torch.Tensor) -> None:
        if not self.queued:  # runs inside the backward pass: the callback runs when it ends
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.fold)

    @torch.no_grad()
    def fold(self) -> None:
        self.queued = False
        ready = [(p, m) for p, m in zip(self.params, self.masters) if p.grad is not None]
        if not ready:
            return
        grads = [p.grad.reshape(-1) for p, _ in ready]
        held = [m.grad for _, m in ready]
        base = held[0]._base if held[0] is not None else None
        whole = len(ready) == len(self.params) and base is not None and base.numel() == self.numel
        if whole and all(g is not None and g._base is base for g in held):
            base.add_(torch.cat(grads))  # every master's grad is a slice of one buffer: one add
        elif all(g is None for g in held):  # the first backward since the grads were cleared
            # one concatenation and one cast: a concatenation into a float32 ``out`` would copy each
            # gradient on its own on CUDA (its batched kernel needs one dtype)
            total = torch.cat(grads).to(torch.float32)
            start = 0
            for _, m in ready:
                m.grad = total[start : start + m.numel()].view_as(m)
                start += m.numel()
        else:  # a backward that reached some parameters only, after one that reached others
            for (_, m), g in zip(ready, grads):
                g = g.view_as(m).to(torch.float32)
                m.grad = g if m.grad is None else m.grad.add_(g)
        for p, _ in ready:
            p.grad = None


def grad_holder(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> nn.Module:
    """The module whose ``.parameters()`` carry ``model``'s gradients: the optimizer's masters for a
    :func:`build_master_weight_optimizer` optimizer (accelerate's wrapper is looked through), else
    ``model``. Pass it to gradient clipping."""
    inner = getattr(optimizer, "optimizer", optimizer)
    masters = getattr(inner, "master_weights", None)
    return model if masters is None else masters
