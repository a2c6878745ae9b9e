"""One Triton kernel for a decode step's attention: the new key/value written to the static cache, and
one token per row attending over the cache, its heads grouped per KV head (GQA).

The ``"matmul"`` decode attention runs five kernels per layer (two cache writes, two batched products
with two query rows each, a softmax) and reads all ``L`` cache slots whatever the context length. This
kernel is one launch per layer: program ``(row, kv head)`` streams that head's keys and values of the
slots before the write slot ``pos`` once, with an online softmax in float32 (flash decoding, Dao et al.
2023, without the split over the sequence: ``batch x kv_heads`` programs already fill the card at the
batch sizes of a rollout). The new token's score and value come from registers, and its key and value are
stored last, so no program reads a slot it writes.

``pos`` is read on the device, so one CUDA graph serves every step. The kernel is wrapped as the custom op
``rlhf_kit::decode_attention`` (it mutates the two caches), so ``torch.compile`` keeps it as one call.

Triton is optional (it ships with CUDA builds of torch); :data:`AVAILABLE` says whether it imported. On
CPU tensors the kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import torch

from rlhf_kit.models.compile import pdl_capable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

AVAILABLE = triton is not None

# Launch settings: slots per loop iteration, warps and software-pipelining stages (Triton's default 3),
# how the two products run (``MODES``), and whether the kernel is launched as a programmatic dependent
# launch (``PDL``, Hopper and later: it may start while the kernel before it drains, and waits for that
# kernel's writes with ``griddepcontrol.wait`` before its first load). These are the settings measured in docs/benchmarks.md;
# bench/decode_attention.py times the alternatives.
CONFIG = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3, "MODE": "native", "PDL": False}

# "tf32": tensor-core products on float32 operands at TF32 precision (exact for bf16/fp16 inputs; the
# query rows padded to 16); "native": tensor-core products on the input dtype with float32 accumulation,
# the probabilities rounded to the input dtype before ``P @ V`` (as the "matmul" path and HF's eager
# attention do); "fma": float32 multiply-adds on the CUDA cores, no padding of the query rows. Float32
# inputs always run "tf32" at IEEE precision; so do bf16 inputs on CPU tensors (Triton's interpreter, whose
# tensor-core product multiplies bf16 operands as raw 16-bit integers).
MODES = ("tf32", "native", "fma")
_MODE_ID = {m: i for i, m in enumerate(MODES)}


if AVAILABLE:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, mask_ptr, pos_ptr, start_ptr, cos_ptr, sin_ptr, out_ptr, scale,
        sq_b, sq_h, sq_g, skn_b, skn_h, svn_b, svn_h, sc_b, sc_h, sc_l, sm_b, scos_b, ssin_b, so_b, so_h, so_g,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_START: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr, MODE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # launched early: every input may still be in flight from the kernel before
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a large cache passes 2**31 elements
        head = tl.program_id(1).to(tl.int64)
        pos = tl.load(pos_ptr)
        lo = 0
        if HAS_START:
            lo = tl.load(start_ptr + row).to(tl.int32)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q_at = q_ptr + row * sq_b + head * sq_h + g[:, None] * sq_g
        q = tl.load(q_at + d[None, :], mask=g[:, None] < G, other=0.0)
        k_new = tl.load(kn_ptr + row * skn_b + head * skn_h + d)
        v_new = tl.load(vn_ptr + row * svn_b + head * svn_h + d)
        # rotary: x cos + rotate_half(x) sin, rotate_half(x) = (-x[D/2:], x[:D/2]), rounded to the input dtype
        if ROPE:
            half = (d + D // 2) % D
            sign = tl.where(d < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + row * scos_b + d).to(tl.float32)
            sin = tl.load(sin_ptr + row * ssin_b + d).to(tl.float32) * sign
            q_half = tl.load(q_at + half[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * cos[None, :] + q_half * sin[None, :]).to(q.dtype)
            k_half = tl.load(kn_ptr + row * skn_b + head * skn_h + half).to(tl.float32)
            k_new = (k_new.to(tl.float32) * cos + k_half * sin).to(k_new.dtype)
        q32 = q.to(tl.float32)
        # the new token first: it is always visible, so the running max starts finite
        m_i = tl.sum(q32 * k_new.to(tl.float32)[None, :], axis=1) * scale  # (GP,)
        l_i = tl.full((GP,), 1.0, tl.float32)
        acc = tl.zeros((GP, D), tl.float32) + v_new.to(tl.float32)[None, :]
        cache = row * sc_b + head * sc_h
        for start in range(lo, pos, BLOCK_N):  # slots before the row's first token (left padding) skipped
            n = start + tl.arange(0, BLOCK_N)
            live = n < pos
            k = tl.load(kc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=live[:, None], other=0.0)
            if MODE == 0:
                s = tl.dot(q32, tl.trans(k.to(tl.float32)), input_precision=PRECISION)  # (GP, BLOCK_N)
            elif MODE == 1:
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.sum(q32[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            s = s * scale
            if HAS_MASK:
                s += tl.load(mask_ptr + row * sm_b + n, mask=live, other=0.0).to(tl.float32)[None, :]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=live[:, None], other=0.0)
            if MODE == 0:
                pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)  # (GP, D)
            elif MODE == 1:
                pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * so_b + head * so_h + g[:, None] * so_g + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g[:, None] < G)  # fmt: skip
        tl.store(kc_ptr + cache + pos * sc_l + d, k_new)
        tl.store(vc_ptr + cache + pos * sc_l + d, v_new)


def fits(head_dim: int) -> bool:
    """Whether the kernel takes this head size (a power of two, at least 16: ``tl.dot``'s smallest tile)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _check(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    b, kv, _, d = query.shape
    if key.shape != (b, kv, 1, d) or k_cache.shape[0] < b or k_cache.shape[1] != kv or k_cache.shape[3] != d:
        raise ValueError(f"shapes do not fit: query {tuple(query.shape)}, key {tuple(key.shape)}, cache "
                         f"{tuple(k_cache.shape)}")  # fmt: skip
    if not fits(d):
        raise ValueError(f"the Triton decode attention needs a power-of-two head size >= 16, got {d}")
    if k_cache.stride(-1) != 1 or query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("the Triton decode attention needs a contiguous last dimension")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or value.shape != key.shape:
        raise ValueError("the key and value caches (and new key and value) must have one shape and layout")
    if mask is not None and (mask.shape[-1] < k_cache.shape[2] or mask.stride(-1) != 1):
        raise ValueError(f"mask {tuple(mask.shape)} must cover the cache's {k_cache.shape[2]} slots")


@torch.library.custom_op("rlhf_kit::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor | None,
    pos: torch.Tensor,
    scale: float,
    start: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``key``/``value (b, kv, 1, d)`` at slot ``pos`` of ``k_cache``/``v_cache (>= b, kv, L, d)`` and
    return the attention of ``query (b, kv, g, d)`` over slots ``0 .. pos`` as ``(b, kv, g, d)``.

    ``mask`` is additive, ``(b, 1, 1, >= L)`` (or None), applied to the slots before ``pos``; the new token
    is always visible. ``pos`` is a one-element integer tensor on the device. Softmax in float32.

    ``start (>= b,)`` (integer, optional): row ``i`` reads no slot before ``start[i]`` -- its left padding,
    which ``mask`` hides anyway, so the result is the same with fewer bytes read. ``cos``/``sin ((b, [1,]
    d), optional)``: the new token's rotary embedding; ``query`` and ``key`` then come unrotated and are
    rotated here (``x cos + rotate_half(x) sin``, Llama's convention, rounded to the input dtype), the key
    stored rotated.
    """
    _check(query, key, value, k_cache, v_cache, mask)
    if not AVAILABLE:
        raise RuntimeError("decode_attention needs Triton (it ships with CUDA builds of torch)")
    b, kv, g, d = query.shape
    if start is not None and (start.dim() != 1 or start.shape[0] < b):
        raise ValueError(f"start must be (>= {b},), got {tuple(start.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin come together")
    if cos is not None:
        cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
        if cos.shape != (b, d) or sin.shape != (b, d) or cos.stride(-1) != 1 or sin.stride(-1) != 1:
            raise ValueError(f"cos and sin must be ({b}, [1,] {d}) with a contiguous last dimension")
    out = torch.empty((b, kv, g, d), dtype=query.dtype, device=query.device)
    cfg = dict(CONFIG)
    mode = cfg.pop("MODE", "tf32")
    pdl = bool(cfg.pop("PDL", False)) and pdl_capable(query.device)
    interpreted_bf16 = query.dtype == torch.bfloat16 and query.device.type == "cpu"
    if query.dtype == torch.float32 or (mode == "native" and interpreted_bf16):
        mode = "tf32"
    if mode not in _MODE_ID:
        raise ValueError(f"decode_kernel.CONFIG['MODE'] must be one of {MODES}, got {mode!r}")
    gp = triton.next_power_of_2(g)
    if mode != "fma":
        gp = max(16, gp)  # tl.dot needs 16 rows; the padding rows are never stored
    m = mask.reshape(mask.shape[0], -1) if mask is not None else out
    c, s_ = (cos, sin) if cos is not None else (out, out)  # placeholders, never read
    _decode_attention_kernel[(b, kv)](
        query, key, value, k_cache, v_cache, m, pos, pos if start is None else start, c, s_, out, scale,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        m.stride(0), c.stride(0), s_.stride(0), out.stride(0), out.stride(1), out.stride(2),
        G=g, GP=gp, D=d, HAS_MASK=mask is not None, HAS_START=start is not None, ROPE=cos is not None,
        **cfg, MODE=_MODE_ID[mode], PDL=pdl, **({"launch_pdl": True} if pdl else {}),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # TF32 holds bf16/fp16 inputs exactly
    )  # fmt: skip
    return out


@decode_attention.register_fake
def _(query, key, value, k_cache, v_cache, mask, pos, scale, start=None, cos=None, sin=None):  # noqa: ANN001, ANN202
    return torch.empty_like(query, memory_format=torch.contiguous_format)
