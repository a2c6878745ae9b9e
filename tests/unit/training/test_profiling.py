import json

import pytest
import torch

from rlhf_kit.training.profiling import StepProfiler


def _work():
    a = torch.randn(64, 64, requires_grad=True)
    (a @ a).sum().backward()


def test_only_the_asked_steps_are_profiled_and_written(tmp_path):
    prof = StepProfiler([2], tmp_path / "profile")
    for n in (1, 2, 3):
        with prof.step(n):
            _work()
    files = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert files == ["step_2.json", "step_2.trace.json", "step_2.txt"]
    summary = json.loads((tmp_path / "profile" / "step_2.json").read_text())
    assert summary["wall_s"] > 0 and summary["calls"] >= 1
    assert 0 < summary["cpu_busy"]
    assert [op["op"] for op in summary["top"]].count("aten::mm") == 1
    assert summary["top"] == sorted(summary["top"], key=lambda op: -op["s"])
    assert json.loads((tmp_path / "profile" / "step_2.trace.json").read_text())["traceEvents"]
    assert "aten::mm" in (tmp_path / "profile" / "step_2.txt").read_text()


def test_begin_end_pair_and_disabled_ranks(tmp_path):
    prof = StepProfiler([1], tmp_path / "on")
    prof.begin(1)
    _work()
    prof.end()
    prof.end()  # nothing active: a no-op
    assert (tmp_path / "on" / "step_1.json").exists()
    off = StepProfiler([1], tmp_path / "off", enabled=False)
    with off.step(1):
        _work()
    assert not (tmp_path / "off").exists()


def test_steps_are_one_based():
    with pytest.raises(ValueError, match="1-based"):
        StepProfiler([0, 3], "unused")
