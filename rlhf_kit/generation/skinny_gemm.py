"""A Triton product for a decode step's projections: ``x @ w.T`` with few rows (the decode batch).

At a decode batch of 64 the four products of a block read megabytes of weights for a few rows of
activations: each is bound by bytes. cuBLAS picks tiles for ``N`` that leave most of the card idle on
the small products (session 18's profile: the QKV and output products at half the copy bandwidth). This
product tiles only ``N`` and ``K``: every program holds all ``M <= 64`` rows, so ``N / BLOCK_N`` programs
(times ``SPLIT_K``) stream disjoint slices of the weight once. With ``SPLIT_K > 1`` the partial sums
meet in a float32 buffer through atomic adds and are cast back after.

Like the decode-attention kernel it needs Triton, imported through
:mod:`rlhf_kit.generation.decode_kernel` (its ``AVAILABLE``), and runs on CPU tensors only in Triton's
interpreter, as the tests do.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_kit.generation.decode_kernel import AVAILABLE, tl, triton

#: Launch settings; bench/decode_gemm.py times the alternatives. ``ENABLED``: whether the fused decode
#: blocks (:mod:`rlhf_kit.generation.fused`) route their products of at most :data:`MAX_ROWS` rows here:
#: ``True``, ``False`` or ``"auto"`` (on CUDA tensors). ``GLU``: the MLP's gate/up product and its
#: ``silu(gate) * up`` in one pass (where the MLP's activation is SiLU). Read when a block is traced or run.
CONFIG = {
    "ENABLED": False,
    "GLU": True,
    "BLOCK_N": 32,
    "BLOCK_K": 256,
    "SPLIT_K": 1,
    "num_warps": 4,
    "num_stages": 3,
}
MAX_ROWS = 64  # one program holds every row


if AVAILABLE:

    @triton.jit
    def _dot(xt, wt, acc, UPCAST: tl.constexpr):
        if UPCAST:  # float32 inputs, and Triton's interpreter (bf16 products there are not bf16 math)
            return tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
        return tl.dot(xt, tl.trans(wt), acc)

    @triton.jit
    def _skinny_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sx_m, sw_n, so_m, K_PER_SPLIT,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        SPLIT: tl.constexpr, GLU: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        k0 = pid_k * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GLU: the up rows (w's second half)
        for k in range(k0, k0 + K_PER_SPLIT, BLOCK_K):
            kk = k + rk
            x_ok = (rm[:, None] < M) & (kk[None, :] < K)
            xt = tl.load(x_ptr + rm[:, None] * sx_m + kk[None, :], mask=x_ok, other=0.0)
            w_at = w_ptr + rn[:, None] * sw_n + kk[None, :]
            w_ok = (rn[:, None] < N) & (kk[None, :] < K)
            acc = _dot(xt, tl.load(w_at, mask=w_ok, other=0.0), acc, UPCAST)
            if GLU:
                acc_up = _dot(xt, tl.load(w_at + N * sw_n, mask=w_ok, other=0.0), acc_up, UPCAST)
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
                if GLU:
                    acc_up += tl.load(b_ptr + N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        at = out_ptr + rm[:, None] * so_m + rn[None, :]
        ok = (rm[:, None] < M) & (rn[None, :] < N)
        if SPLIT:
            tl.atomic_add(at, acc, mask=ok)
        elif GLU:  # silu(gate) * up, each step rounded to the output dtype as the unfused modules round
            dt = out_ptr.dtype.element_ty
            gate = acc.to(dt).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
            tl.store(at, (act * acc_up.to(dt).to(tl.float32)).to(dt), mask=ok)
        else:
            tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=ok)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Can :func:`linear` run ``x @ w.T`` (Triton present, ``M <= MAX_ROWS`` rows, contiguous rows)?"""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        AVAILABLE
        and 0 < rows <= MAX_ROWS
        and x.dtype == w.dtype
        and w.dim() == 2
        and x.shape[-1] == w.shape[1]
        and x.stride(-1) == 1
        and w.stride(1) == 1
    )


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    glu: bool = False,
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for ``x`` of at most :data:`MAX_ROWS` rows (all leading dims together).

    Shapes: x ``(..., K)``, w ``(N, K)``, bias ``(N,)`` -> ``(..., N)`` in ``x``'s dtype, accumulated in
    float32. ``config`` overrides :data:`CONFIG` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, warps, stages).
    ``glu``: ``w`` is gate and up stacked (``N = 2 I``), and the result is ``silu(gate) * up``, ``(..., I)``
    (Llama's MLP before its down product), in one pass without a split of ``K``.
    """
    if not supported(x, w):
        raise ValueError(f"skinny_gemm.linear: unsupported input {tuple(x.shape)} x {tuple(w.shape)}")
    cfg = {**CONFIG, **(config or {})}
    cfg.pop("ENABLED")
    cfg.pop("GLU", None)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], w.shape[0]
    if glu:
        if n % 2:
            raise ValueError(f"skinny_gemm.linear(glu=True): gate and up need an even row count, got {n}")
        n //= 2
    split = 1 if glu else int(cfg["SPLIT_K"])
    block_k = int(cfg["BLOCK_K"])
    per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split > 1 else x.new_empty(m, n)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    _skinny_kernel[grid](
        x2, w, bias if bias is not None else w, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0), per_split,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        HAS_BIAS=bias is not None, SPLIT=split > 1, GLU=glu, UPCAST=x.dtype == torch.float32 or x.device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if split > 1:
        out = out.to(x.dtype)
    return out.view(*lead, n)


def enabled_for(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Does ``CONFIG["ENABLED"]`` route this product here (and can :func:`linear` run it)?"""
    on = CONFIG["ENABLED"]
    return bool(x.is_cuda if on == "auto" else on) and supported(x, w)


@torch.library.custom_op("rlhf_kit::skinny_linear", mutates_args=())
def skinny_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, glu: bool = False
) -> torch.Tensor:
    """:func:`linear` at :data:`CONFIG`'s settings as one opaque op, so ``torch.compile`` keeps the call."""
    return linear(x, w, bias, glu=glu)


@skinny_linear.register_fake
def _(x, w, bias=None, glu=False):  # noqa: ANN001, ANN202
    return x.new_empty(*x.shape[:-1], w.shape[0] // 2 if glu else w.shape[0])


def project(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, module: Any = None
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` (or ``module(x)``, whose weight and bias these are), through
    :func:`skinny_linear` where :func:`enabled_for` says so."""
    if enabled_for(x, w):
        return skinny_linear(x, w, bias)
    return module(x) if module is not None else torch.nn.functional.linear(x, w, bias)


def project_glu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act: Any) -> torch.Tensor:
    """``act(gate) * up`` of ``F.linear(x, w, bias)`` split in halves; one :func:`skinny_linear` pass
    (``glu=True``) where :func:`enabled_for` says so and ``CONFIG["GLU"]`` is on (``act`` must be SiLU)."""
    if CONFIG.get("GLU", True) and enabled_for(x, w):
        return skinny_linear(x, w, bias, glu=True)
    gate, up = project(x, w, bias).chunk(2, -1)
    return act(gate) * up
