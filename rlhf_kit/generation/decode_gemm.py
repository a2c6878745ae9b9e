"""One Triton kernel for a decode step's projections: ``y = x @ w.T (+ b)`` for a few rows ``x`` (a bucket of
one token per sequence) against a large weight ``w``, with the weights fetched while the kernel before is
still running.

At 64 rows a projection is a stream of its weights (4-46 MB per product on the bench configs), yet cuBLAS's
kernels reach 1.3-2.4 TB/s on them against the card's 3 TB/s copy rate (docs/benchmarks.md, session 27's
1B profile): each one waits for the kernel before it to end, then ramps its loads up from nothing. This
kernel is launched as a programmatic dependent launch (Hopper and later): program ``(n tile, k chunk)``
loads its ``BN x KC`` slice of the weights -- which no kernel of the decode step writes -- *before*
``griddepcontrol.wait``, so those loads overlap the previous kernel's tail; only then does it read ``x``.
The ``K`` dimension is split into chunks (split-K, as cuBLAS does for these shapes) so enough programs
stream at once; each program stores its float32 partial tile, and the last program of an ``n`` tile to
finish (an atomic counter per tile, reset by that program) sums the partials in chunk order, adds the bias
and writes ``y``. The sum's order is fixed, so the result does not depend on which program ends last, and
the kernel needs no memset and no second launch.

Wrapped as the custom op ``rlhf_kit::decode_linear`` so ``torch.compile`` keeps it as one call. Triton is
optional; on CPU tensors the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, the tests).
:func:`linear` is what the fused decode modules call: the kernel where it applies, ``F.linear`` elsewhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from rlhf_kit.models.compile import pdl_capable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

AVAILABLE = triton is not None

# Launch settings: output columns per program (``BN``), the K step per loop iteration (``KC``), the number of
# programs aimed at per streaming multiprocessor (``WAVES``: the K range is split into as many chunks as it
# takes to reach about ``WAVES x SMs`` programs, no more, as each chunk adds a float32 partial tile to write and
# sum), warps, software-pipelining stages of the K loop, and whether to launch as a programmatic dependent
# launch (capability 9 and later only). MAX_ROWS: the most rows one program's tile holds; larger inputs go to
# F.linear. bench/decode_gemm.py sweeps these; docs/benchmarks.md has the measured ones.
CONFIG = {"BN": 64, "KC": 256, "WAVES": 2, "num_warps": 4, "num_stages": 3, "PDL": True}
MAX_ROWS = 64

if AVAILABLE:

    @triton.jit
    def _dot(x, w, UPCAST: tl.constexpr):
        if UPCAST:  # Triton's interpreter multiplies 16-bit float operands of tl.dot as integers
            return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        return tl.dot(x, tl.trans(w))  # float32 accumulation

    @triton.jit
    def _decode_linear_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, sx_m, sw_n, sy_m,
        BM: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, STEPS: tl.constexpr, SPLIT: tl.constexpr,
        HAS_BIAS: tl.constexpr, PDL: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)  # this program's K chunk: STEPS steps of KC from k0
        n = pid_n * BN + tl.arange(0, BN)
        m = tl.arange(0, BM)
        k0 = pid_k * STEPS * KC
        k = k0 + tl.arange(0, KC)
        w_at = w_ptr + n[:, None].to(tl.int64) * sw_n
        x_at = x_ptr + m[:, None] * sx_m
        # the first weights before the wait: no kernel of the step writes them, so they load while the
        # kernel before drains
        w = tl.load(w_at + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x (and y, the partials, the counters) may be in use until here
        x = tl.load(x_at + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        acc = _dot(x, w, UPCAST)  # (BM, BN)
        for step in range(1, STEPS):
            k = k0 + step * KC + tl.arange(0, KC)
            w = tl.load(w_at + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
            x = tl.load(x_at + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            acc += _dot(x, w, UPCAST)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rows, cols = m[:, None], n[None, :]
        keep = (rows < M) & (cols < N)
        if SPLIT > 1:
            tile = rows * BN + tl.arange(0, BN)[None, :]
            tl.store(part_ptr + (pid_n * SPLIT + pid_k) * BM * BN + tile, acc)
            tl.debug_barrier()  # every thread's partial is stored before the counter moves
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if done == SPLIT - 1:  # the last chunk of this n tile to finish: sum the partials in chunk order
                total = tl.zeros((BM, BN), tl.float32)
                for s in range(SPLIT):  # its own partial from registers, the others from L2
                    at = part_ptr + (pid_n * SPLIT + s) * BM * BN + tile
                    total += tl.where(
                        s == pid_k, acc, tl.load(at, mask=s != pid_k, other=0.0, cache_modifier=".cg")
                    )
                if HAS_BIAS:
                    total += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + rows * sy_m + cols, total.to(y_ptr.dtype.element_ty), mask=keep)
                tl.atomic_xchg(count_ptr + pid_n, 0)  # ready for the next call (or the next graph replay)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows * sy_m + cols, acc.to(y_ptr.dtype.element_ty), mask=keep)


_SMS: dict[torch.device, int] = {}


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (4 for the interpreter on CPU, so tests split K)."""
    if device not in _SMS:
        cuda = device.type == "cuda"
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    return _SMS[device]


def plan(n: int, k: int, device: torch.device, cfg: dict | None = None) -> tuple[int, int, int, int]:
    """``(n tiles, K chunks, KC steps per chunk, KC)`` of one product: the K range split into as few chunks as
    bring the programs to about ``WAVES x SMs``."""
    cfg = cfg or CONFIG
    kc = min(cfg["KC"], max(16, triton.next_power_of_2(k)))
    tiles, steps_all = triton.cdiv(n, cfg["BN"]), triton.cdiv(k, kc)
    want = max(1, min(steps_all, round(cfg["WAVES"] * _sms(device) / tiles)))
    steps = triton.cdiv(steps_all, want)
    return tiles, triton.cdiv(steps_all, steps), steps, kc


_POOL = 1 << 16  # counters per device: far more than the tiles of all kernels that can run at once
_COUNTERS: dict[torch.device, list] = {}  # device -> [int32 counters, next free offset]


def reserve(device: torch.device | str) -> None:
    """Allocate ``device``'s zeroed counters (once). Call it before a CUDA graph is captured: a capture may
    not make the first allocation of a buffer that outlives it."""
    device = torch.device(device)
    if device not in _COUNTERS:
        _COUNTERS[device] = [torch.zeros(_POOL, dtype=torch.int32, device=device), 0]


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """``tiles`` zero counters for one call. Successive calls take successive slices of the device's pool
    (wrapping around), so kernels in flight at once -- on several streams, or launched early by PDL -- never
    share one; each call's last programs leave their counters zero again."""
    if device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "decode_linear: call decode_gemm.reserve(device) before capturing a CUDA graph"
            )
        reserve(device)
    if tiles > _POOL:
        raise ValueError(f"decode_linear: {tiles} output tiles exceed the {_POOL} counters")
    pool = _COUNTERS[device]
    if pool[1] + tiles > _POOL:
        pool[1] = 0
    start = pool[1]
    pool[1] += tiles
    return pool[0][start : start + tiles]


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` runs the kernel: Triton present, a CUDA (or interpreted CPU) 16-bit input of at
    most :data:`MAX_ROWS` rows, the weight's rows contiguous, one dtype and device."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        AVAILABLE
        and (x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
        and 0 < rows <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(-1) == 1
        and x.device == weight.device
    )


@torch.library.custom_op("rlhf_kit::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ weight (N, K).T + bias (N,)`` as ``(..., N)`` in ``x``'s dtype, float32 accumulation;
    at most :data:`MAX_ROWS` rows in ``x``."""
    if not AVAILABLE:
        raise RuntimeError("decode_linear needs Triton (it ships with CUDA builds of torch)")
    if not applies(x, weight):
        raise ValueError(f"decode_linear takes <= {MAX_ROWS} rows of a 16-bit x and a row-contiguous weight "
                         f"of its dtype; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)}")  # fmt: skip
    lead, k_dim = x.shape[:-1], x.shape[-1]
    n_dim = weight.shape[0]
    if weight.shape[1] != k_dim or (bias is not None and bias.shape != (n_dim,)):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    x2 = x.reshape(-1, k_dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m_dim = x2.shape[0]
    cfg = dict(CONFIG)
    tiles, split, steps, kc = plan(n_dim, k_dim, x.device, cfg)
    bn, pdl = cfg.pop("BN"), bool(cfg.pop("PDL")) and pdl_capable(x.device)
    del cfg["KC"], cfg["WAVES"]
    bm = max(16, triton.next_power_of_2(m_dim))
    y = torch.empty((m_dim, n_dim), dtype=x.dtype, device=x.device)
    part = torch.empty(
        (tiles * split * bm * bn,) if split > 1 else (1,), dtype=torch.float32, device=x.device
    )
    count = _counters(x.device, tiles)
    _decode_linear_kernel[(tiles, split)](
        x2, weight, bias if bias is not None else y, y, part, count, m_dim, n_dim, k_dim,
        x2.stride(0), weight.stride(0), y.stride(0),
        BM=bm, BN=bn, KC=kc, STEPS=steps, SPLIT=split, HAS_BIAS=bias is not None, PDL=pdl,
        UPCAST=x.device.type == "cpu", **cfg, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y.reshape(*lead, n_dim)


@decode_linear.register_fake
def _(x, weight, bias=None):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool
) -> torch.Tensor:
    """``F.linear``, or :func:`decode_linear` when ``use_kernel`` and the kernel :func:`applies`."""
    if use_kernel and applies(x, weight):
        return decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)
