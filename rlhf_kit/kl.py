"""KL penalty estimators and KL-coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020), with ``log r = ref - logp`` for
samples drawn from the policy.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "abs", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logprobs, ref_logprobs: ``(b, t)`` log-probs of the sampled tokens.
        estimator: ``"k1"`` (logp - ref, unbiased, can be negative), ``"abs"`` (|logp - ref|,
            NeMo-Aligner's default), ``"k2"`` (0.5 * k1^2) or ``"k3"`` (exp(ref - logp) - (ref - logp) - 1,
            unbiased and non-negative).

    Returns ``(b, t)``.
    """
    k1 = logprobs - ref_logprobs
    if estimator == "k1":
        return k1
    if estimator == "abs":
        return k1.abs()
    if estimator == "k2":
        return 0.5 * k1.square()
    if estimator == "k3":
        log_ratio = -k1
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {ESTIMATORS}")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for interface parity with :class:`AdaptiveKLController`)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional KL controller of Ziegler et al. 2019 (arXiv:1909.08593, section 2.2).

    ``error = clip(kl / target - 1, -0.2, 0.2)`` and ``coef *= 1 + error * n_steps / horizon``.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: the measured mean KL per sequence; ``n_steps``: samples in this update."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
