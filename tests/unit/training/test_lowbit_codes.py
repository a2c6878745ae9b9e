import pytest
import torch

from rlhf_kit.training.lowbit import torchao_quant_utils
from rlhf_kit.training.lowbit_codes import _from_ordered, _ordered, code_tables, quantize_with_tables

pytest.importorskip("torchao")  # the [lowbit] extra; CI installs it (constraints), so this never skips there


def _qmap(signed: bool) -> torch.Tensor:
    return torch.tensor(torchao_quant_utils().create_dynamic_map(signed), dtype=torch.float32)


def _interval_ends() -> torch.Tensor:
    """The lowest and highest fp32 of every 16-bit prefix whose values lie in [-1, 1]."""
    k = torch.arange(1 << 16, dtype=torch.int64)
    high = ((k << 16) - (k >= 0x8000).long() * (1 << 32)).to(torch.int32)
    ends = torch.cat([high, high | 0xFFFF]).view(torch.float32)
    return ends[ends.abs() <= 1]


@pytest.mark.parametrize("signed", [True, False])
def test_table_codes_equal_torchaos_binary_search(signed):
    quantize = torchao_quant_utils().quantize_8bit_with_qmap
    qmap = _qmap(signed)
    table, bounds = code_tables(qmap)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    spread = torch.randn(n, generator=g) * 10 ** (-8 * torch.rand(n, generator=g))  # 1e-8 .. 1 magnitudes
    steps = bounds[1:-1]
    x = torch.cat([
        spread.clamp(-1, 1),
        qmap,  # the code values themselves
        steps, torch.nextafter(steps, torch.tensor(-2.0)),  # both sides of every step
        (qmap[1:] + qmap[:-1]) / 2,  # the midpoints torchao rounds at
        _interval_ends(),  # every table interval's two ends: between them the code is monotone
        torch.tensor([0.0, -0.0, 1.0, -1.0, float("nan")]),
    ])  # fmt: skip
    if not signed:
        x = x.abs()
    else:  # block scaling yields no infinity; -inf still gets torchao's code (+inf would not)
        x = torch.cat([x, torch.tensor([float("-inf")])])
    ours, theirs = quantize_with_tables(x, table, bounds), quantize(x, qmap)
    assert ours.dtype == theirs.dtype == torch.uint8
    assert torch.equal(ours, theirs), int((ours != theirs).sum())
    assert len(set(theirs.tolist())) == 256  # every code was exercised


@pytest.mark.parametrize("signed", [True, False])
def test_torchaos_codes_never_decrease_along_the_fp32_line(signed):
    """The premise of the tables: the code is a step function of the value."""
    qmap = _qmap(signed)
    lo, hi = (_ordered(torch.tensor(v).view(torch.int32)) for v in (-1.0 if signed else 0.0, 1.0))
    line = _from_ordered(torch.arange(int(lo), int(hi), 401, dtype=torch.int64))  # ~5M values, in order
    codes = torchao_quant_utils().quantize_8bit_with_qmap(line, qmap).long()
    assert bool((codes[1:] >= codes[:-1]).all())
    table, bounds = code_tables(qmap)
    # each step is where the code first reaches it
    steps = bounds[1:-1]
    up = torchao_quant_utils().quantize_8bit_with_qmap(steps, qmap).long()
    below = (
        torchao_quant_utils().quantize_8bit_with_qmap(torch.nextafter(steps, torch.tensor(-2.0)), qmap).long()
    )
    assert torch.equal(up, torch.arange(1, 256)) and bool((below < up).all())


def test_a_map_denser_than_the_fp32_prefixes_is_refused():
    qmap = torch.cat([torch.tensor([-1.0]), torch.linspace(0.999, 1.0, 255)])  # 255 codes in 0.1% of 1
    with pytest.raises(ValueError, match="more than one step"):
        code_tables(qmap)
