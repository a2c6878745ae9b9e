"""The Triton decode-attention kernel (rlhf_kit.generation.decode_kernel) against a float64 reference.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py); on a CUDA
machine the same tests run the compiled kernel on the GPU."""

from __future__ import annotations

import pytest
import torch

from rlhf_kit.generation import decode_kernel
from rlhf_kit.generation.decode_kernel import AVAILABLE, MODES, decode_attention, fits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, kv, g, d, slots, pos, dtype, seed, rows=None):
    gen = torch.Generator().manual_seed(seed)
    rows = rows or b + 1  # a cache row past the batch must stay untouched
    q = torch.randn(b, kv, g, d, generator=gen)
    k_new, v_new = torch.randn(b, kv, 1, d, generator=gen), torch.randn(b, kv, 1, d, generator=gen)
    k_cache, v_cache = (
        torch.randn(rows, kv, slots, d, generator=gen),
        torch.randn(rows, kv, slots, d, generator=gen),
    )
    visible = torch.rand(b, slots, generator=gen) < 0.7
    visible[:, pos:] = False  # slots from pos on are not read (pos is written); the new token is always seen
    visible[0, :pos] = False  # a row whose whole cache is padding attends to the new token alone
    mask = torch.zeros(b, 1, 1, slots).masked_fill(~visible[:, None, None, :], torch.finfo(dtype).min)
    cast = (q, k_new, v_new, k_cache, v_cache, mask)
    return [t.to(dtype).to(DEVICE) for t in cast], visible


def _reference(q, k_new, v_new, k_cache, v_cache, visible, pos, scale):
    """Float64 grouped-query attention over the visible cache slots plus the new token."""
    b, kv, g, d = q.shape
    keys = torch.cat([k_cache[:b, :, :pos], k_new], 2).double()  # (b, kv, pos + 1, d)
    values = torch.cat([v_cache[:b, :, :pos], v_new], 2).double()
    seen = torch.cat([visible[:, :pos], torch.ones(b, 1, dtype=torch.bool)], 1).to(q.device)
    scores = (q.double() @ keys.transpose(-1, -2)) * scale  # (b, kv, g, pos + 1)
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "b, kv, g, d, slots, pos",
    [
        (3, 2, 2, 16, 80, 70),  # two blocks of 64, the second partial
        (2, 1, 4, 32, 64, 0),  # the first step: no cache slot is read
        (2, 2, 1, 64, 192, 191),  # the last slot, three blocks; one query head per KV head
        (1, 2, 5, 16, 130, 129),  # a group size that is not a power of two
    ],
)
def test_kernel_matches_float64_reference_and_writes_only_its_slot(b, kv, g, d, slots, pos, dtype):
    (q, k_new, v_new, k_cache, v_cache, mask), visible = _case(b, kv, g, d, slots, pos, dtype, seed=pos + g)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = decode_attention(q, k_new, v_new, k_cache, v_cache, mask, torch.tensor([pos], device=DEVICE), 0.3)
    ref = _reference(q, k_new, v_new, k_before, v_before, visible, pos, 0.3)
    assert out.shape == q.shape and out.dtype == dtype
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    # row 0 sees only its new token: its output is that token's value, exactly up to rounding
    torch.testing.assert_close(
        out[0], v_new[0].expand_as(out[0]), rtol=0, atol=1e-6 if dtype == torch.float32 else 8e-3
    )
    # the new key and value land in slot pos of rows < b; nothing else in either cache changes
    want_k, want_v = k_before.clone(), v_before.clone()
    want_k[:b, :, pos], want_v[:b, :, pos] = k_new[:, :, 0], v_new[:, :, 0]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# Triton's interpreter multiplies bf16 tensor-core operands as raw 16-bit integers (its create_dot
# converts only 8-bit floats), so on CPU the "native" mode is checked in float16, the same code path.
_MODE_DTYPES = [(m, t) for m in MODES for t in (torch.float16, torch.bfloat16)
                if not (m == "native" and t == torch.bfloat16 and DEVICE == "cpu")]  # fmt: skip


@pytest.mark.parametrize("mode, dtype", _MODE_DTYPES)
def test_every_product_mode_matches_the_reference_in_16_bits(mode, dtype, monkeypatch):
    """Each way of running the two products (decode_kernel.MODES), a group of 2 and one of 3."""
    monkeypatch.setitem(decode_kernel.CONFIG, "MODE", mode)
    for g, d, pos in ((2, 32, 100), (3, 32, 64), (2, 128, 70)):  # head size 128: Llama-3, Qwen2.5
        (q, k_new, v_new, k_cache, v_cache, mask), visible = _case(2, 2, g, d, 128, pos, dtype, 11)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        out = decode_attention(
            q, k_new, v_new, k_cache, v_cache, mask, torch.tensor([pos], device=DEVICE), 0.2
        )
        ref = _reference(q, k_new, v_new, k_before, v_before, visible, pos, 0.2)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (mode, g, d, rel)
        assert torch.equal(k_cache[:2, :, pos], k_new[:, :, 0]) and torch.equal(
            v_cache[:2, :, pos], v_new[:, :, 0]
        )
    monkeypatch.setitem(decode_kernel.CONFIG, "MODE", "fp8")
    with pytest.raises(ValueError, match="MODE"):
        decode_attention(q, k_new, v_new, k_cache, v_cache, mask, torch.tensor([pos], device=DEVICE), 0.2)


def test_masked_and_later_slots_have_no_influence():
    (q, k_new, v_new, k_cache, v_cache, mask), visible = _case(2, 2, 2, 16, 128, 90, torch.float32, seed=7)
    pos = torch.tensor([90], device=DEVICE)
    out = decode_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), mask, pos, 0.25)
    hidden = ~visible[:, None, :, None].expand(2, 2, 128, 16).to(DEVICE)
    k2, v2 = k_cache.clone(), v_cache.clone()
    k2[:2][hidden], v2[:2][hidden] = 1e4, -1e4  # masked slots and every slot from pos on
    torch.testing.assert_close(
        decode_attention(q, k_new, v_new, k2, v2, mask, pos, 0.25), out, rtol=0, atol=1e-6
    )


def test_without_a_mask_every_slot_before_pos_is_seen():
    (q, k_new, v_new, k_cache, v_cache, _), _ = _case(2, 1, 2, 16, 96, 65, torch.float32, seed=3)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = decode_attention(q, k_new, v_new, k_cache, v_cache, None, torch.tensor([65], device=DEVICE), 0.25)
    ref = _reference(q, k_new, v_new, k_before, v_before, torch.ones(2, 96, dtype=torch.bool), 65, 0.25)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_dependent_launch_gives_the_same_bits(monkeypatch):
    """CONFIG["PDL"]: on Hopper the kernel is launched early and waits for its inputs (griddepcontrol.wait)
    after the products that write them; elsewhere (the interpreter here) the setting is ignored. Either way the
    output and the cache write are those of a plain launch."""
    (q, k_new, v_new, k_cache, v_cache, mask), _ = _case(3, 2, 2, 32, 96, 75, torch.bfloat16, seed=9)
    pos = torch.tensor([75], device=DEVICE)
    runs = []
    for pdl in (False, True):
        monkeypatch.setitem(decode_kernel.CONFIG, "PDL", pdl)
        kc, vc = k_cache.clone(), v_cache.clone()
        # the inputs are written by the kernels just before the launch, as the QKV product writes them
        qq, kn = q * 1.0, k_new + 0.0
        runs.append((decode_attention(qq, kn, v_new, kc, vc, mask, pos, 0.2), kc, vc))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.equal(runs[1][1][:3, :, 75], k_new[:, :, 0])


def test_compiled_caller_keeps_the_cache_write():
    """The op mutates its caches: a compiled caller (functionalised graph) must still write them."""
    (q, k_new, v_new, k_cache, v_cache, mask), _ = _case(2, 2, 2, 16, 64, 10, torch.float32, seed=5)
    pos = torch.tensor([10], device=DEVICE)

    def step(q, k_new, v_new, k_cache, v_cache, mask, pos):
        return decode_attention(q * 1.0, k_new + 0.0, v_new, k_cache, v_cache, mask, pos, 0.25) * 2.0

    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    want = step(q, k_new, v_new, k_eager, v_eager, mask, pos)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(
        q, k_new, v_new, k_cache, v_cache, mask, pos
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
    assert torch.equal(k_cache[:2, :, 10], k_new[:, :, 0])


def test_bad_inputs_are_refused_before_launch():
    assert AVAILABLE  # Triton comes with the dev extras; the CPU run uses its interpreter
    assert fits(16) and fits(128) and not fits(8) and not fits(80)
    (q, k_new, v_new, k_cache, v_cache, mask), _ = _case(2, 2, 2, 16, 64, 10, torch.float32, seed=1)
    pos = torch.tensor([10], device=DEVICE)
    with pytest.raises(ValueError, match="shapes do not fit"):
        decode_attention(q, k_new[:1], v_new[:1], k_cache, v_cache, mask, pos, 0.3)
    with pytest.raises(ValueError, match="one shape and layout"):
        decode_attention(q, k_new, v_new, k_cache, v_cache[:, :, :32], mask, pos, 0.3)
    with pytest.raises(ValueError, match="must cover"):
        decode_attention(q, k_new, v_new, k_cache, v_cache, mask[..., :32], pos, 0.3)
    q24 = torch.randn(2, 2, 2, 24, device=DEVICE)
    kv24 = torch.randn(2, 2, 1, 24, device=DEVICE)
    cache24 = torch.randn(3, 2, 64, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head size"):
        decode_attention(q24, kv24, kv24, cache24, cache24.clone(), None, pos, 0.3)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the call without start, on CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_start_skips_each_rows_left_padding_unread(dtype):
    """Slots before ``start[row]`` (left padding, masked) are never read: NaN there leaves the output equal
    to the reference, where the call without ``start`` reads them and turns NaN."""
    b, kv, g, d, slots, pos = 3, 2, 2, 16, 160, 150
    (q, k_new, v_new, k_cache, v_cache, _), visible = _case(b, kv, g, d, slots, pos, dtype, seed=21)
    start = torch.tensor([0, 37, 100, 5], device=DEVICE)  # one entry past the batch is ignored
    visible[:] = True
    visible[:, pos:] = False
    for i in range(b):
        visible[i, : int(start[i])] = False
    mask = torch.zeros(b, 1, 1, slots).masked_fill(~visible[:, None, None, :], torch.finfo(dtype).min)
    mask = mask.to(dtype).to(DEVICE)
    ref = _reference(q, k_new, v_new, k_cache.clone(), v_cache.clone(), visible, pos, 0.3)
    for i in range(b):
        k_cache[i, :, : int(start[i])] = float("nan")
        v_cache[i, :, : int(start[i])] = float("nan")
    p = torch.tensor([pos], device=DEVICE)
    out = decode_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), mask, p, 0.3, start)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    unskipped = decode_attention(q, k_new, v_new, k_cache, v_cache, mask, p, 0.3)
    assert torch.isnan(unskipped[1:]).all() and not torch.isnan(unskipped[0]).any()
    with pytest.raises(ValueError, match="start must be"):
        decode_attention(q, k_new, v_new, k_cache, v_cache, mask, p, 0.3, start[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_inside_the_kernel_equals_rotating_first(dtype):
    """With ``cos``/``sin`` the kernel rotates the query and the new key itself (Llama's rotate_half
    convention, transformers' apply_rotary_pos_emb): the output and the stored key match rotating first."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, kv, g, d, pos = 2, 2, 3, 32, 70
    (q, k_new, v_new, k_cache, v_cache, mask), _ = _case(b, kv, g, d, 96, pos, dtype, seed=4)
    angle = torch.rand(b, 1, d // 2, generator=torch.Generator().manual_seed(0)) * 6.0
    emb = torch.cat([angle, angle], -1)
    cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
    # transformers' layout: query (b, heads, 1, d) and key (b, kv, 1, d), cos/sin (b, 1, d)
    q_rot, k_rot = apply_rotary_pos_emb(
        q.reshape(b, kv * g, 1, d).float(), k_new.float(), cos.float(), sin.float()
    )
    q_rot, k_rot = q_rot.to(dtype).reshape(b, kv, g, d), k_rot.to(dtype)
    p = torch.tensor([pos], device=DEVICE)
    k1, v1 = k_cache.clone(), v_cache.clone()
    want = decode_attention(q_rot, k_rot, v_new, k1, v1, mask, p, 0.3)
    k2, v2 = k_cache.clone(), v_cache.clone()
    got = decode_attention(q, k_new, v_new, k2, v2, mask, p, 0.3, None, cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(k2[:b, :, pos], k_rot[:, :, 0], rtol=tol, atol=tol)  # stored rotated
    assert torch.equal(v2[:b, :, pos], v_new[:, :, 0]) and torch.equal(k2[:, :, :pos], k_cache[:, :, :pos])
    assert not torch.allclose(
        got, decode_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), mask, p, 0.3)
    )
    with pytest.raises(ValueError, match="come together"):
        decode_attention(q, k_new, v_new, k2, v2, mask, p, 0.3, None, cos, None)
    with pytest.raises(ValueError, match="cos and sin must be"):
        decode_attention(q, k_new, v_new, k2, v2, mask, p, 0.3, None, cos[..., :16], sin[..., :16])
