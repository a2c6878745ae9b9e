"""Advantage estimation (GAE) and masked whitening, as pure tensor functions.

Conventions (NeMo-Aligner, TRL): tensors are ``(b, t)`` over response positions; ``mask`` is 1 on
response tokens (including the final EOS) and 0 on padding after the response ends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GAE:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    rewards and values multiplied by ``mask`` so that each sequence bootstraps ``V = 0`` after its last
    response token. ``returns = advantages + values``. The reverse recursion is one product per 256
    positions (:func:`discounted_cumsum`).

    Example (NeMo-Aligner's hand-worked case): gamma 0.5, lam 0, values [0, 1, 2, 3], rewards
    [0, 0, 1, 0] -> advantages [0.5, 0, 0.5, -3].
    """

    def __init__(self, gamma: float = 1.0, lam: float = 0.95):
        if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
        self.gamma = gamma
        self.lam = lam

    @torch.no_grad()
    def __call__(
        self, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``rewards``, ``values``, ``mask`` all ``(b, t)``. Returns ``(advantages, returns)``,
        each ``(b, t)`` float32, zero where ``mask`` is 0 (returns too)."""
        if not (rewards.shape == values.shape == mask.shape):
            raise ValueError(
                f"shape mismatch: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, "
                f"mask {tuple(mask.shape)}"
            )
        m = mask.float()
        r = rewards.float() * m
        v = values.float() * m
        next_v = torch.nn.functional.pad(v[:, 1:], (0, 1))  # V_{t+1}, 0 past the last position
        delta = r + self.gamma * next_v - v
        adv = discounted_cumsum(delta, self.gamma * self.lam) * m
        return adv, (adv + v) * m


def discounted_cumsum(x: torch.Tensor, discount: float, chunk: int = 256) -> torch.Tensor:
    """Reverse discounted cumulative sum: ``y_t = x_t + discount * y_{t+1}``, ``y`` past the end 0, i.e.
    ``y_t = sum_{k >= t} discount^(k - t) x_k`` (GAE's advantages from its deltas, a reward-to-go).

    ``x (b, t)`` -> ``(b, t)`` float32. Each chunk of ``chunk`` positions, from the end, is one product
    with the ``(chunk, chunk)`` matrix ``D[k, j] = discount^(k - j)`` (``k >= j``, else 0) plus the
    carried ``y`` of the next chunk's first position times ``discount^(end - j)``, in float64 (float32
    on MPS, which has none). A loop over positions launches several kernels per position: about 1,500
    tiny launches for 256 positions, each waiting on the host.
    """
    b, t = x.shape
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    xd = x.to(dtype)
    c = max(1, min(chunk, t))
    idx = torch.arange(c, device=x.device, dtype=dtype)
    gap = idx[:, None] - idx[None, :]  # k - j
    d = torch.where(
        gap >= 0, torch.pow(discount, gap.clamp(min=0)), torch.zeros((), dtype=dtype, device=x.device)
    )
    out = torch.empty_like(xd)
    carry = xd.new_zeros(b)
    for end in range(t, 0, -c):
        start = max(0, end - c)
        n = end - start
        y = xd[:, start:end] @ d[:n, :n] + carry[:, None] * torch.pow(discount, n - idx[:n])
        out[:, start:end] = y
        carry = y[:, 0]
    return out.float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all positions or along ``dim``)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of ``x`` over masked positions (biased by default, as NeMo-Aligner)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n.clamp(min=1)
    var = (((x - mean) * m) ** 2).sum() / n.clamp(min=1)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def global_masked_moments(
    x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked mean, biased variance and count of ``x``; across all ranks of ``group`` when a process
    group is initialised (one all-reduce of ``[sum, sum of squares, count]`` in float64)."""
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    stats = torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    s, sq, n = stats.unbind()
    n_safe = n.clamp(min=1)
    mean = s / n_safe
    var = (sq / n_safe - mean * mean).clamp(min=0)
    return mean.to(x.dtype), var.to(x.dtype), n


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` over all valid positions.

    Args:
        x, mask: ``(b, t)``.
        shift_mean: if False, the mean is added back (scale only), as for rewards.
        group: process group for global statistics (default: the world, when initialised).

    Returns ``(b, t)``, zero at masked-out positions.
    """
    mean, var, _ = global_masked_moments(x, mask, group)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)
