"""Shared pieces of the TRL comparison benchmarks (``bench/ppo_vs_trl.py``, ``bench/rm_vs_trl.py``).

* Model configs: bench config A / B are the ``A`` / ``1B`` widths of :data:`bench.generation.CONFIGS`
  (random-init Llama; one tokenizer: an 8k byte-level BPE trained on the shipped HH file).
* Data: HH prompts (``rlhf_kit.data.hh.process_hh_file`` + ``tokenize_prompts``, left-truncated) and
  HH comparison pairs (``tokenize_pairs``), tokenised once by the parent process and handed to every
  worker as JSON, so both systems see exactly the same token ids.
* Timing and memory helpers; each system runs in its own subprocess (:func:`run_worker`) so that
  ``torch.cuda.max_memory_allocated`` is that system's alone.
* :func:`make_chart` draws the PNG of ``docs/benchmarks.md`` from the two result files.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.generation import CONFIGS  # noqa: E402  (the config-A/1B widths live with the generation bench)

#: Bench config name -> key of :data:`bench.generation.CONFIGS`.
BENCH_CONFIGS = {"A": "A", "B": "1B", "S": "S", "tiny": "tiny"}


# ----------------------------------------------------------------------------------------------------
# models and data


def llama_config(name: str, tokenizer: Any, num_labels: int | None = None) -> Any:
    """``LlamaConfig`` of bench config ``name`` (A, B or tiny) for ``tokenizer``'s vocabulary.

    ``num_labels=1`` makes it a reward-model / critic config (``AutoModelForSequenceClassification``).
    """
    from transformers import LlamaConfig

    kw = dict(CONFIGS[BENCH_CONFIGS[name]])
    if num_labels is not None:
        kw["num_labels"] = num_labels
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **kw,
    )


def build_tokenizer(path: str, tiny: bool) -> Any:
    """Train (or load, if ``path`` holds one) the bench tokenizer: 8k BPE (512 for ``tiny``), left padding."""
    from transformers import AutoTokenizer

    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(path)
    from rlhf_kit.tiny import train_tokenizer

    tok = train_tokenizer(vocab_size=512 if tiny else 8192, padding_side="left")
    tok.save_pretrained(path)
    return tok


def hh_prompt_ids(tokenizer: Any, max_prompt_length: int) -> list[list[int]]:
    """Token ids of the shipped HH prompts (dialogue up to the final ``Assistant:``), left-truncated."""
    from rlhf_kit import default_hh_file
    from rlhf_kit.data import tokenize_prompts
    from rlhf_kit.data.hh import process_hh_file

    _, prompts, _ = process_hh_file(default_hh_file())
    ids, _ = tokenize_prompts(prompts, tokenizer, max_prompt_length)
    return ids


def hh_pair_examples(tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """``{"chosen_input_ids", "rejected_input_ids"}`` of the shipped HH pairs (EOS appended; pairs with a
    side over ``max_length`` dropped and counted by ``tokenize_pairs``)."""
    from rlhf_kit import default_hh_file
    from rlhf_kit.data import tokenize_pairs
    from rlhf_kit.data.hh import process_hh_file

    comparisons, _, _ = process_hh_file(default_hh_file())
    examples, _ = tokenize_pairs(comparisons, tokenizer, max_length, "drop")
    return examples


# ----------------------------------------------------------------------------------------------------
# timing and memory


def sync(device: torch.device | str) -> None:
    """Wait for the device (CUDA work is asynchronous); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PhaseClock:
    """Wall-clock phases of one step, each closed by a device synchronisation.

    >>> clock = PhaseClock(device); clock.start(); ...; clock.lap("generate"); ...; clock.lap("train")
    """

    def __init__(self, device: torch.device | str):
        self.device = device
        self.t = 0.0
        self.phases: dict[str, float] = {}
        self.laps: list[str] = []  # phase names in order: the profiler ranges "phase#i" (phase_device_times)
        self._range = None

    def start(self) -> None:
        sync(self.device)
        self.t = time.perf_counter()
        self.phases = {}
        self.laps = []
        if self._range is not None:  # the last range of the previous step is still open
            self._range.__exit__(None, None, None)
        self._open()

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now
        self._range.__exit__(None, None, None)
        self.laps.append(name)
        self._open()

    def _open(self) -> None:
        self._range = torch.profiler.record_function(f"phase#{len(self.laps)}")
        self._range.__enter__()


def phase_device_times(prof, laps: list[str], top: int = 8) -> dict[str, dict]:
    """Per phase of a profiled :class:`PhaseClock` step: wall seconds of the phase's range, the device
    seconds its kernels ran (each lap syncs, so a phase's kernels run inside its range), their count,
    and the ``top`` kernels by device time. ``prof`` is a finished ``torch.profiler.profile``."""
    from torch.autograd import DeviceType

    events = prof.events()
    ranges = {e.name: e.time_range for e in events if e.name.startswith("phase#")}
    kernels = [  # the ranges' own annotations on the GPU timeline are not kernels
        e for e in events
        if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0 and not e.name.startswith("phase#")
    ]  # fmt: skip
    out: dict[str, dict] = {}
    for i, name in enumerate(laps):
        r = ranges.get(f"phase#{i}")
        if r is None:
            continue
        inside = [k for k in kernels if r.start <= k.time_range.start < r.end]
        busy: dict[str, float] = {}
        for k in inside:
            busy[k.name] = busy.get(k.name, 0.0) + k.time_range.elapsed_us() / 1e6
        out[name] = {
            "wall_s": r.elapsed_us() / 1e6,
            "device_busy_s": sum(busy.values()),
            "kernels": len(inside),
            "top_kernels": sorted(([n[:100], round(t, 6)] for n, t in busy.items()), key=lambda x: -x[1])[
                :top
            ],
        }
    return out


def median_after_warmup(times: list[float], warmup: int) -> float:
    """Median of ``times[warmup:]`` (``nan`` if nothing is left)."""
    rest = times[warmup:]
    return statistics.median(rest) if rest else float("nan")


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        from rlhf_kit.training.memory_budget import forget_peaks

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        forget_peaks()


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Peak allocated / reserved GiB since the last reset (zeros on CPU)."""
    if torch.device(device).type != "cuda":
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    from rlhf_kit.training.memory_budget import peak_memory  # a MemoryBudget's reset does not hide a peak

    allocated, reserved = peak_memory(device)
    return {"peak_allocated_gib": allocated / 2**30, "peak_reserved_gib": reserved / 2**30}


def matmul_peak_tflops(device: torch.device | str, n: int = 8192, reps: int = 20) -> float:
    """The card's measured bf16 matrix throughput: median TFLOP/s of ``n x n @ n x n`` products (CUDA
    events; 3 warm-up products first). NaN off CUDA."""
    if torch.device(device).type != "cuda":
        return float("nan")
    import statistics

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def train_model_flops(model: torch.nn.Module, rows: int, width: int) -> float:
    """Model FLOPs of one forward + backward over ``rows x width`` tokens: ``6 * P * tokens`` for the
    ``P`` weights of every ``nn.Linear`` (the LM or value head included, embeddings not) plus causal
    attention, ``6 * layers * width * hidden`` per token (half of the non-causal ``12 L T d``).
    Recomputation (gradient checkpointing) is not model FLOPs and is not counted."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    tokens = rows * width
    return 6.0 * linear * tokens + 6.0 * layers * width * hidden * tokens


def environment() -> dict[str, Any]:
    """Hardware and package versions for the report."""
    import importlib.metadata as md

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "accelerate", "trl", "datasets", "peft"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env["gpu"] = None
    return env


# ----------------------------------------------------------------------------------------------------
# files and subprocesses


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder + ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_worker(
    script: str, worker_args: list[str], result_path: str, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python script --worker ...`` in a fresh process; return its result JSON (or the failure).

    The worker writes ``result_path``; its output is echoed and the last 3,000 characters are kept in
    the result under ``log_tail``. A timeout or crash adds ``"error"`` to whatever the worker had saved
    (nothing, or its results before the pass that failed) instead of raising, so one failing system or
    pass does not lose the other numbers.
    """
    if os.path.exists(result_path):
        os.remove(result_path)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, script, *worker_args, "--result", result_path]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=full_env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log, rc = out + f"\n[timeout after {timeout:.0f}s]", -9
    print(log[-6000:], flush=True)
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {}
    if os.path.exists(result_path):  # complete, or what a worker saved before it failed
        with open(result_path) as f:
            res = json.load(f)
    if rc != 0:
        res["error"] = f"worker exited with {rc}"
    res["wall_s"] = wall
    res["log_tail"] = log[-3000:]
    return res


def fmt(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and x == x else "n/a"


# ----------------------------------------------------------------------------------------------------
# chart


def make_chart(ppo: dict | None, rm: dict | None, png: str) -> None:
    """Bars: PPO step time (ours split into phases) and peak memory per config; RM pairs/s and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    phase_colors = {"generate": "#4c72b0", "score": "#55a868", "train": "#c44e52", "sync": "#8172b2"}
    if ppo:
        ax, labels, x = axes[0], [], 0
        mem_ax = axes[1]
        for cfg in ppo.get("configs", []):
            ours, trl = cfg.get("ours", {}), cfg.get("trl", {})
            if "median_step_s" in trl and not cfg.get("trl_shared"):  # one TRL bar per config
                ax.bar(x, trl["median_step_s"], color="#999999")
                mem_ax.bar(x, trl["peak_allocated_gib"], color="#999999")
                labels.append(f"TRL {cfg['config']}")
                x += 1
            if "median_step_s" in ours:
                bottom = 0.0
                for ph, val in ours.get("median_phases_s", {}).items():
                    ax.bar(x, val, bottom=bottom, color=phase_colors.get(ph, "#cccccc"), label=ph)
                    bottom += val
                mem_ax.bar(x, ours["peak_allocated_gib"], color="#4c72b0")
                ratio = cfg.get("speedup")
                if ratio:
                    ax.text(x, ours["median_step_s"], f"{ratio:.1f}x", ha="center", va="bottom")
                labels.append(f"ours {cfg['config']}")
                x += 1
        for a in (ax, mem_ax):
            a.set_xticks(range(len(labels)), labels, rotation=20)
        handles, names = ax.get_legend_handles_labels()
        uniq = dict(zip(names, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.set_ylabel("PPO step time, s (median)")
        ax.set_title("PPO step (64 prompts x 128 tokens)")
        mem_ax.set_ylabel("peak allocated, GiB")
        mem_ax.set_title("PPO peak GPU memory")
    if rm:
        ax = axes[2]
        names, vals, colors = [], [], []
        for name, r in rm.get("systems", {}).items():
            if "pairs_per_s" in r:
                names.append(f"{name}\n{r['peak_allocated_gib']:.1f} GiB")
                vals.append(r["pairs_per_s"])
                colors.append("#999999" if name.lower().startswith("trl") else "#4c72b0")
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, fontsize=8)
        ax.set_ylabel("pairs / s")
        ax.set_title("Reward model training (HH, max length 1024)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def load_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def chart_main(argv: list[str] | None = None) -> None:
    """``python bench/common.py chart RESULTS_DIR PNG``: draw the chart from the two result files."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "chart":
        raise SystemExit("usage: python bench/common.py chart RESULTS_DIR OUT.png")
    d = argv[1]
    make_chart(
        load_json(os.path.join(d, "ppo_vs_trl.json")), load_json(os.path.join(d, "rm_vs_trl.json")), argv[2]
    )
    print(f"wrote {argv[2]}")


def env_for_trl(site: str | None) -> dict[str, str]:
    """Environment of a TRL worker: ``site`` (a folder holding a specific TRL) first on PYTHONPATH."""
    env = {"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
    return env


if __name__ == "__main__":
    chart_main()
