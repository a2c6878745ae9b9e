"""bench/trace_gaps.py: device-idle gaps of a chrome trace, per phase and by the host's stack."""

from __future__ import annotations

import json

import pytest
import torch

from bench.trace_gaps import gap_report, main, short_stack


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _trace():
    """Two phases. In ``phase#0`` (0-100 us) kernel k2 is launched late, while ``slow()`` runs on the host
    (a host gap of 30 us); k3 is launched early but starts late (a queued gap of 10 us); a kernel on a
    second stream overlaps k1 (merged busy time). ``phase#1`` (100-160 us) starts with 20 us of host work
    before its kernel."""
    ev = [
        _x("user_annotation", "phase#0", 0, 100),
        _x("user_annotation", "phase#1", 100, 60),
        _x("python_function", "recipes/ppo.py(10): main", 0, 160),
        _x("python_function", "rlhf_kit/ppo/update.py(5): step", 1, 90),
        _x("python_function", "rlhf_kit/models/varlen.py(69): slow", 20, 40),
        _x("python_function", "torch/nn/modules/module.py(1): _call_impl", 25, 5),
        _x("cpu_op", "aten::item", 30, 5),
        _x("python_function", "rlhf_kit/ppo/score.py(7): score", 101, 50),
        _x("cuda_runtime", "cudaLaunchKernel", 2, 1, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 3, 1, correlation=9),
        _x("cuda_runtime", "cudaLaunchKernel", 50, 1, correlation=2),
        _x("cuda_runtime", "cudaLaunchKernel", 52, 1, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 118, 1, correlation=4),
        _x("kernel", "k1", 5, 15, tid=7, correlation=1),
        _x("kernel", "k1b", 10, 8, tid=8, correlation=9),
        _x("kernel", "k2", 50, 10, tid=7, correlation=2),
        _x("kernel", "k3", 70, 20, tid=7, correlation=3),
        _x("kernel", "k4", 120, 30, tid=7, correlation=4),
    ]
    return {"traceEvents": ev}


def test_gap_report_splits_host_and_queued_gaps_per_phase():
    rep = gap_report(_trace(), min_us=5)
    p0, p1 = rep["phases"]["phase#0"], rep["phases"]["phase#1"]
    assert p0["busy_us"] == 15 + 10 + 20  # k1b lies inside k1: merged, not counted twice
    # gaps: 0-5 before k1 (host, launch at 2 > 0), 20-50 before k2 (host), 60-70 before k3 (queued)
    assert p0["gaps_us"] == 5 + 30 + 10 and p0["gaps"] == 3
    assert p0["host_us"] == 35 and p0["queued_us"] == 10
    assert p0["tail_us"] == 10  # k3 ends at 90, the phase at 100
    assert p1["busy_us"] == 30 and p1["gaps_us"] == 20 and p1["host_us"] == 20
    stacks = dict((s, us) for s, us, _ in rep["host_stacks"])
    # the 30 us gap is probed at 35 us, where slow() runs (the module call inside it ended at 30)
    slow = "recipes/ppo.py(10): main > rlhf_kit/ppo/update.py(5): step > rlhf_kit/models/varlen.py(69): slow"
    assert stacks[slow] == 30
    assert stacks["recipes/ppo.py(10): main > rlhf_kit/ppo/score.py(7): score"] == 20
    assert rep["largest"][0]["us"] == 30 and rep["largest"][0]["next"] == "k2"
    # the queued gap is probed at its start (60 us), when slow() (20-60) has returned
    assert [q[0] for q in rep["queued_stacks"]] == [
        "recipes/ppo.py(10): main > rlhf_kit/ppo/update.py(5): step"
    ]


def test_gap_report_charges_the_innermost_operator():
    tr = _trace()
    tr["traceEvents"].append(_x("cpu_op", "aten::_local_scalar_dense", 33, 4))
    tr["traceEvents"] = [e for e in tr["traceEvents"] if e["name"] != "aten::item"]
    # the 30 us gap is probed at 35 us: inside _local_scalar_dense (33-37)
    rep = gap_report(tr, min_us=5)
    ops = {o: us for o, us, _ in rep["host_ops"]}
    assert ops["aten::_local_scalar_dense"] == 30


def test_short_stack_keeps_own_frames_and_the_innermost():
    frames = [
        "a.py(1): x",
        "recipes/ppo.py(2): main",
        "torch/x.py(3): y",
        "rlhf_kit/a.py(4): f",
        "torch/z.py(5): g",
    ]
    assert short_stack(frames, keep=1) == "rlhf_kit/a.py(4): f > torch/z.py(5): g"
    assert short_stack([]) == "(no Python frame)"


def test_report_of_a_real_profiler_trace(tmp_path, capsys):
    """The format torch.profiler writes: the phase range and Python frames are found (no kernels on CPU)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        with record_function("phase#0"):
            torch.randn(8, 8).sum()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    main([str(path)])
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["phases"]) == {"phase#0"} and rep["phases"]["phase#0"]["busy_us"] == 0
    assert rep["phases"]["phase#0"]["wall_us"] > 0


def test_a_bad_trace_file_stops_with_one_line(tmp_path):
    bad = tmp_path / "trace.json"
    bad.write_text('{"traceEvents": [')
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as stop:
            main([str(path)])
        msg = str(stop.value)
        assert str(path) in msg and "\n" not in msg
