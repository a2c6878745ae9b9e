"""Rounding to 8-bit codes with two table reads per value instead of a binary search.

torchao's ``quantize_8bit_with_qmap`` finds a value's code in the 256-entry dynamic map by an 8-step
branchless binary search and then rounds to the nearer neighbour: ten dependent reads of the map per
value. In the fused AdamW8bit update those reads, not the bytes moved, bound the kernel
(docs/benchmarks.md). The code is a non-decreasing step function of the fp32 value, so it is fixed by
its 255 steps: ``bounds[c]``, the smallest fp32 value whose code is at least ``c``. The top 16 bits of an
fp32 (sign, exponent, 7 mantissa bits) split the line into 65,536 intervals, and no interval holds more
than one step of either map. With ``table[k]``, the code of the interval's lowest value::

    code(x) = table[k] + (x >= bounds[table[k] + 1]),   k = top 16 bits of x

Both tables are computed from torchao's own function (the steps by bisection over fp32 values) and
checked at every interval's two ends when built, so the codes are torchao's, bit for bit (tested).
"""

from __future__ import annotations

import functools
import logging

import torch

from rlhf_kit.errors import ConfigError

_KEYS = 1 << 16
_INT32_MIN = -(1 << 31)
_QUANT_UTILS = None  # torchao.optim.quant_utils once imported (read by the compiled update)


def torchao_quant_utils():
    """torchao's ``quant_utils`` module (a one-line :class:`ConfigError` with the install hint when missing)."""
    global _QUANT_UTILS
    if _QUANT_UTILS is not None:
        return _QUANT_UTILS
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it names each prebuilt C++ kernel this torch cannot load (unused here)
    try:
        from torchao.optim import quant_utils
    except ImportError as e:
        raise ConfigError(f"--optimizer adamw8bit needs torchao: pip install 'rlhf-kit[lowbit]' ({e})") from e
    finally:
        quiet.setLevel(level)
    _QUANT_UTILS = quant_utils
    return quant_utils


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the fp32 order of the int32 bit patterns ``bits`` (-0 and +0 tie)."""
    b = bits.long()
    return torch.where(b < 0, -(b & 0x7FFFFFFF), b)


def _from_ordered(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 values of :func:`_ordered` keys."""
    bits = torch.where(keys < 0, (-keys) | _INT32_MIN, keys)
    return bits.to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=4)
def _code_tables(qmap_values: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    quantize = torchao_quant_utils().quantize_8bit_with_qmap
    qmap = torch.tensor(qmap_values, dtype=torch.float32)
    n = qmap.numel()

    def code(x: torch.Tensor) -> torch.Tensor:
        return quantize(x, qmap).long()

    # bounds[c]: the smallest fp32 x with code(x) >= c, by bisection over the ordered fp32 line
    want = torch.arange(1, n, dtype=torch.long)
    lo = torch.full_like(want, int(_ordered(torch.tensor(-2.0).view(torch.int32))))  # code 0 there
    hi = torch.full_like(want, int(_ordered(torch.tensor(2.0).view(torch.int32))))  # the last code there
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        up = code(_from_ordered(mid)) >= want
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    inf = torch.tensor([float("inf")])
    bounds = torch.cat([-inf, _from_ordered(hi), inf])  # (n + 1,): bounds[0] and bounds[n] never decide

    # table[k]: the code of the lowest value of interval k (for a negative k that is its low 16 bits set)
    k = torch.arange(_KEYS, dtype=torch.int64)
    high = ((k << 16) - (k >= 0x8000).long() * (1 << 32)).to(torch.int32)  # the bits, as a signed int32
    sign = k >= 0x8000
    low_bits = torch.where(sign, high | 0xFFFF, high).view(torch.float32)
    high_bits = torch.where(sign, high, high | 0xFFFF).view(torch.float32)
    finite = torch.isfinite(low_bits) & torch.isfinite(high_bits)
    table = torch.where(finite, code(torch.where(finite, low_bits, 0.0)), 0)
    top = code(torch.where(finite, high_bits, 0.0))
    reached = table + (high_bits >= bounds[table + 1]).long()
    bad = finite & ((top - table > 1) | (reached != top))
    if bool(bad.any()):  # a map with steps closer than 7 mantissa bits: this scheme does not apply
        raise ValueError(f"lowbit: {int(bad.sum())} fp32 intervals hold more than one step of the code map")
    return table.to(torch.int32), bounds


def code_tables(qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table (65536,) int32, bounds (len(qmap) + 1,) float32)`` for :func:`quantize_with_tables`, on
    ``qmap``'s device. Built once per map (about 0.02 s on a CPU core) from torchao's quantiser."""
    table, bounds = _code_tables(tuple(qmap.detach().cpu().tolist()))
    return table.to(qmap.device), bounds.to(qmap.device)


def quantize_with_tables(x: torch.Tensor, table: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """uint8 codes of fp32 ``x`` (any shape), equal to ``quantize_8bit_with_qmap(x, qmap)`` for the map
    the tables came from (:func:`code_tables`): two reads per value. ``x`` is finite or NaN (code 0), as
    after block scaling; +inf, which scaling never yields, would get code 1 instead of the last."""
    key = (x.view(torch.int32) >> 16) & 0xFFFF
    floor = table[key]
    return (floor + (x >= bounds[floor + 1]).to(floor.dtype)).to(torch.uint8)
