"""Where the GPU waits: idle gaps of a profiled step's device timeline, and what the host was doing.

A phase whose wall time exceeds its kernels' time has gaps on the device timeline. For each gap this reads
a ``torch.profiler`` chrome trace (Kineto's JSON) and asks what came next:

* *host*: the next kernel was launched after the device went idle, so the host was the bottleneck; the gap
  is charged to the Python stack (``with_stack=True``) and innermost operator active on the launching
  thread halfway between the device going idle and that launch;
* *queued*: it was launched before the device went idle, so it waited on something else (an event, a
  copy from pageable host memory, another stream).

:func:`gap_report` returns totals per phase (the ``phase#i`` ranges of :class:`bench.common.PhaseClock`)
and the stacks that cost the most idle time. ``bench/ppo_vs_trl.py --trace-gaps`` runs it on the GPU
machine, where the trace is written and read (it is too large to bring back).

    python bench/trace_gaps.py trace.json [--min-us 5]     # a report of a saved trace, as JSON
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
from typing import Any

#: Device-timeline event categories (Kineto chrome-trace ``cat``) that keep the GPU busy.
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
#: Host-side categories whose ``args.correlation`` links a launch to its device event.
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
#: Frames kept when a stack is shortened: the library, recipes and benches (the rest is context).
OWN = ("rlhf_kit/", "recipes/", "bench/")


def _complete(events: list[dict], cats: tuple[str, ...]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in cats and "dur" in e]


class _Stacks:
    """The nesting of one thread's complete events (``python_function`` or ``cpu_op``): which were open at
    a given time, outermost first. Queries must come in non-decreasing time order (one sweep)."""

    def __init__(self, events: list[dict]):
        self.events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        self.i = 0
        self.open: list[dict] = []

    def at(self, t: float) -> list[str]:
        while self.i < len(self.events) and self.events[self.i]["ts"] <= t:
            e = self.events[self.i]
            # nested events end innermost first: pop what ended before this one starts (a trace hundreds of
            # thousands of events long, so no rescan of the whole open list per event)
            while self.open and self.open[-1]["ts"] + self.open[-1]["dur"] <= e["ts"]:
                self.open.pop()
            self.open.append(e)
            self.i += 1
        # an outer event the clock rounds to end before an inner one still sits below it: filtered here
        return [o["name"] for o in self.open if o["ts"] + o["dur"] > t]


def short_stack(frames: list[str], keep: int = 4) -> str:
    """The innermost ``keep`` frames of our own code (:data:`OWN`) plus the innermost frame of all, joined
    outermost first: enough to name the call site without the whole interpreter's nesting."""
    own = [f for f in frames if any(p in f for p in OWN)][-keep:]
    inner = frames[-1:] if frames and (not own or frames[-1] != own[-1]) else []
    return " > ".join(own + inner) or "(no Python frame)"


def gap_report(trace: dict[str, Any], min_us: float = 5.0, top: int = 25) -> dict[str, Any]:
    """Device-idle gaps of ``trace`` (a chrome trace's dict), per ``phase#i`` range and by host stack.

    Returns ``{"phases": {name: {wall_us, busy_us, gaps_us, host_us, queued_us, tail_us, gaps,
    gaps_ge_min}},
    "host_stacks": [[stack, idle_us, gaps]], "host_ops": [[op, idle_us, gaps]], "queued_stacks": [...],
    "largest": [{phase, us, kind, stack, op}]}``. Gaps shorter than ``min_us`` (a CUDA graph's launch
    spacing) count in the totals but are not attributed."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    device = sorted(_complete(events, DEVICE_CATS), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e
        for e in _complete(events, LAUNCH_CATS)
        if "correlation" in e.get("args", {})
    }
    phases = sorted(
        (e for e in _complete(events, ("user_annotation",)) if str(e.get("name", "")).startswith("phase#")),
        key=lambda e: e["ts"],
    )
    by_tid: dict[Any, dict[str, list[dict]]] = collections.defaultdict(lambda: {"py": [], "op": []})
    for e in _complete(events, ("python_function",)):
        by_tid[e.get("tid")]["py"].append(e)
    for e in _complete(events, ("cpu_op",)):
        by_tid[e.get("tid")]["op"].append(e)

    starts = [p["ts"] for p in phases]

    def phase_of(t: float) -> str | None:
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t < phases[i]["ts"] + phases[i]["dur"]:
            return phases[i]["name"]
        return None

    out_phases: dict[str, dict[str, float]] = {
        p["name"]: {"wall_us": p["dur"], "busy_us": 0.0, "gaps_us": 0.0, "host_us": 0.0, "queued_us": 0.0,
                    "gaps": 0, "gaps_ge_min": 0}
        for p in phases
    }  # fmt: skip
    by_name = {p["name"]: p for p in phases}
    gaps: list[tuple[float, float, dict, str]] = []  # (idle from, idle to, next device event, phase)
    end = None
    for e in device:
        ph = phase_of(e["ts"])
        if ph is None:
            end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
            continue
        # busy time merged over streams: count only what extends past the running end
        lo = e["ts"] if end is None else max(e["ts"], end)
        out_phases[ph]["busy_us"] += max(0.0, e["ts"] + e["dur"] - lo)
        # idle before this event, within its phase: from the phase's start (the host's work after the
        # previous phase's synchronisation) or from the last device event
        idle = by_name[ph]["ts"] if end is None else max(end, by_name[ph]["ts"])
        if e["ts"] > idle:
            gaps.append((idle, e["ts"], e, ph))
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])

    # attribute in time order (one sweep per thread)
    stacks = {tid: (_Stacks(v["py"]), _Stacks(v["op"])) for tid, v in by_tid.items()}
    host = collections.defaultdict(lambda: [0.0, 0])
    host_ops = collections.defaultdict(lambda: [0.0, 0])
    queued = collections.defaultdict(lambda: [0.0, 0])
    largest: list[dict[str, Any]] = []
    pending = []
    for lo, hi, nxt, ph in gaps:
        us = hi - lo
        s = out_phases[ph]
        s["gaps_us"] += us
        s["gaps"] += 1
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        kind = "host" if launch is None or launch["ts"] > lo else "queued"
        s[f"{kind}_us"] += us
        if us < min_us:
            continue
        s["gaps_ge_min"] += 1
        probe = lo + (min(hi, launch["ts"]) - lo) / 2 if kind == "host" and launch else lo
        pending.append((probe, us, kind, ph, launch.get("tid") if launch else None, nxt))
    for probe, us, kind, ph, tid, nxt in sorted(pending, key=lambda p: p[0]):
        py, op = stacks.get(tid, (None, None))
        frames = py.at(probe) if py else []
        ops = op.at(probe) if op else []
        stack, opname = short_stack(frames), (ops[-1] if ops else "(no operator)")
        table = host if kind == "host" else queued
        table[stack][0] += us
        table[stack][1] += 1
        if kind == "host":
            host_ops[opname][0] += us
            host_ops[opname][1] += 1
        largest.append({"phase": ph, "us": round(us, 1), "kind": kind, "stack": stack, "op": opname,
                        "next": str(nxt.get("name", ""))[:80]})  # fmt: skip

    def ranked(table: dict) -> list[list[Any]]:
        return [[k, round(v[0], 1), v[1]] for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]]

    for s in out_phases.values():
        # after the phase's last device event: the synchronisation that closes it, and host work before it
        s["tail_us"] = max(0.0, s["wall_us"] - s["busy_us"] - s["gaps_us"])
        for k in ("wall_us", "busy_us", "gaps_us", "host_us", "queued_us", "tail_us"):
            s[k] = round(s[k], 1)
    return {
        "min_us": min_us,
        "phases": out_phases,
        "host_stacks": ranked(host),
        "host_ops": ranked(host_ops),
        "queued_stacks": ranked(queued),
        "largest": sorted(largest, key=lambda g: -g["us"])[:top],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="a chrome trace written by torch.profiler's export_chrome_trace")
    ap.add_argument("--min-us", type=float, default=5.0, help="gaps shorter than this are only counted")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    try:
        with open(args.trace) as f:
            trace = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"trace_gaps: {args.trace}: not a readable chrome trace ({e})") from None
    report = gap_report(trace, args.min_us, args.top)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
