"""Non-finite values caught before they are applied: per-sample rewards, gradient norms, saved tensors.

One NaN reward whitened into every advantage, or one inf loss stepped into AdamW, turns every weight
into NaN and every later checkpoint with it. :class:`NonFiniteGuard` stops that at three points:

* :meth:`NonFiniteGuard.drop_samples`: PPO samples whose score, log-probs or values are not finite are
  masked out of the rollout (they take no gradient and no part in whitening), counted;
* :meth:`NonFiniteGuard.clip`: wraps a gradient-clipping function; a non-finite total norm (a NaN/inf
  loss in any micro-batch on any rank gives one) drops the gradients, so the optimizer step that
  follows changes nothing, counted;
* :meth:`NonFiniteGuard.end_step`: adds the counts to the step's metrics and stops the run with
  :class:`~rlhf_kit.errors.NonFiniteError`, naming the step and the quantities, once more than
  ``max_bad_steps`` steps had anything skipped.

:func:`check_finite_state` is the last line: the checkpoint and model writers refuse a state dict with
a non-finite tensor, so nothing poisoned is ever written.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rlhf_kit.errors import NonFiniteError
from rlhf_kit.training import dist as D


def nonfinite_names(stats: Mapping[str, Any]) -> list[str]:
    """Keys of ``stats`` whose float value is NaN or inf, as ``"name=value"``."""
    return [f"{k}={v}" for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]


def check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor of ``state`` with a NaN/inf."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            if not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                raise NonFiniteError(
                    f"refusing to write {what}: tensor {name!r} has {n} non-finite values (NaN/inf)"
                )


def check_finite_on_all_ranks(
    state: Mapping[str, torch.Tensor], what: str, device: torch.device | str | None = None
) -> None:
    """:func:`check_finite_state` on the main process (the one holding a gathered full state dict),
    then the verdict shared, so every rank raises alike (collective under a process group)."""
    problem = ""
    if D.is_main_process():
        try:
            check_finite_state(state, what)
        except NonFiniteError as e:
            problem = str(e)
    if D.is_dist():
        if device is None:
            nccl = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        if D.all_reduce_sum([float(bool(problem))], device)[0] and not problem:
            problem = f"refusing to write {what}: a tensor has non-finite values (NaN/inf)"
    if problem:
        raise NonFiniteError(problem)


def nonfinite_samples(rollout: Any) -> torch.Tensor:
    """``(b,)`` bool: samples whose score, or any response-token log-prob, reference log-prob or value,
    is NaN/inf (``rollout``: a :class:`rlhf_kit.rollout.Rollout` before advantages are computed)."""
    m = rollout.response_mask.bool()
    bad = ~torch.isfinite(rollout.scores.float())
    for t in (rollout.logprobs, rollout.ref_logprobs, rollout.values):
        bad |= (~torch.isfinite(t.float()) & m).any(-1)
    return bad


def mask_samples(rollout: Any, bad: torch.Tensor) -> Any:
    """``rollout`` with the samples ``bad (b,)`` masked out: response mask 0 and their float fields 0.

    Masked samples take no policy or value gradient and do not enter whitening statistics; the batch
    keeps its size, so mini-batch splits (and the optimizer steps of every rank) are unchanged.
    """
    out = {}
    for f in dataclasses.fields(rollout):
        t = getattr(rollout, f.name)
        if f.name == "response_mask":
            t = t * (~bad).to(t.dtype)[:, None]
        elif t.is_floating_point():
            shape = (-1,) + (1,) * (t.dim() - 1)
            t = torch.where(bad.view(shape).to(t.device), torch.zeros_like(t), t)
        out[f.name] = t
    return type(rollout)(**out)


class NonFiniteGuard:
    """Counts non-finite samples and skipped updates, and stops a run that keeps producing them.

    ``max_bad_steps``: steps with anything skipped that are tolerated; one more stops the run.
    """

    def __init__(self, max_bad_steps: int = 10) -> None:
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.total_skipped_updates = 0
        self.total_dropped_samples = 0
        self._skipped: list[str] = []
        self._dropped = 0

    def drop_samples(self, rollout: Any, group_size: int = 1) -> Any:
        """Mask out samples with non-finite scores, log-probs or values (see :func:`mask_samples`); with
        ``group_size`` K > 1 (K consecutive samples of one prompt), a bad sample masks its whole group, so
        no group baseline averages in a masked sample's zero score."""
        bad = nonfinite_samples(rollout)
        if group_size > 1:
            bad = bad.view(-1, group_size).any(-1).repeat_interleave(group_size)
        n = int(bad.sum())
        if not n:
            return rollout
        self._dropped += n
        return mask_samples(rollout, bad)

    def skip_update(self, quantity: str, value: float) -> None:
        """Record that one optimizer update was skipped because ``quantity`` was ``value``."""
        self._skipped.append(f"{quantity}={value}")

    def clip(self, clip_grad: Callable[[nn.Module, float], float], quantity: str = "grad_norm"):
        """Wrap ``clip_grad(module, max_norm) -> norm``: a non-finite norm drops the module's gradients
        (``grad = None``: the following ``optimizer.step()`` leaves those parameters alone) and is
        counted. The norm is the same on every rank (it is reduced), so all ranks skip together."""

        def clip_or_drop(module: nn.Module, max_norm: float) -> float:
            norm = clip_grad(module, max_norm)
            if not math.isfinite(norm):
                for p in module.parameters():
                    p.grad = None
                self.skip_update(f"{quantity} ({type(module).__name__})", norm)
            return norm

        return clip_or_drop

    def end_step(
        self, step: int, stats: dict[str, Any] | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Counters for the step's metrics; raises :class:`NonFiniteError` past the limit.

        ``stats`` (the step's metrics) are scanned for NaN/inf values to name them in the message.
        Collective under a process group (dropped samples are summed over ranks, so every rank
        decides alike); ``device`` is where the reduction runs (the accelerator's device).
        """
        skipped, dropped = self._skipped, self._dropped
        self._skipped, self._dropped = [], 0
        dropped = int(D.all_reduce_sum([float(dropped)], device)[0])
        self.total_skipped_updates += len(skipped)
        self.total_dropped_samples += dropped
        if skipped or dropped:
            self.bad_steps += 1
            if self.bad_steps > self.max_bad_steps:
                what = [f"{n} x {q}" if n > 1 else q for q, n in Counter(skipped).items()]
                what += [f"{dropped} samples with non-finite reward/log-prob/value"] if dropped else []
                seen = nonfinite_names(stats or {})
                raise NonFiniteError(
                    f"step {step}: non-finite {', '.join(what)}"
                    + (f" ({', '.join(seen)})" if seen else "")
                    + f"; {self.bad_steps} steps had non-finite values, more than the limit of "
                    f"{self.max_bad_steps} (--max-bad-steps); the last checkpoint is clean"
                )
        return {
            "nonfinite/skipped_updates": float(len(skipped)),
            "nonfinite/dropped_samples": float(dropped),
            "nonfinite/bad_steps": float(self.bad_steps),
        }

    def state_dict(self) -> dict[str, int]:
        return {
            "bad_steps": self.bad_steps,
            "total_skipped_updates": self.total_skipped_updates,
            "total_dropped_samples": self.total_dropped_samples,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.bad_steps = int(state["bad_steps"])
        self.total_skipped_updates = int(state["total_skipped_updates"])
        self.total_dropped_samples = int(state["total_dropped_samples"])
