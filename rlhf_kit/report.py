"""The quickstart's closing report: what each stage wrote and what its numbers say, as ``report.md``.

Reads the outputs the recipes leave (``final/`` models, the reward model's ``eval_results.json``, PPO's
``metrics.jsonl``, evaluate's ``eval.json``); a missing one stops with one line naming the file. PPO's
validation reward and KL curves are saved as a PNG when matplotlib is installed (``pip install
'rlhf-kit[plot]'``); without it the report says so in one line and gives the rest.

    from rlhf_kit.report import StageDirs, write_report
    text, path = write_report(StageDirs.under("outputs/quickstart"), "outputs/quickstart/report.md")
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rlhf_kit.errors import DataError
from rlhf_kit.training.atomic import write_file
from rlhf_kit.training.metrics import read_metrics

#: PPO's validation curves in metrics.jsonl (logged by rlhf_kit.ppo.validation_metrics).
VAL_REWARD, VAL_KL = "val/reward/score_mean", "val/kl/seq_mean"
#: The shipped tiny defaults are ~140k parameters; below this many the report says what they cannot show.
TINY_PARAMETERS = 10_000_000
PLOT_HINT = "pip install 'rlhf-kit[plot]'"


@dataclass(frozen=True)
class StageDirs:
    """The output directory of each quickstart stage."""

    data: Path
    sft: Path
    rm: Path
    ppo: Path
    eval: Path

    @classmethod
    def under(cls, root: str | os.PathLike) -> StageDirs:
        """The layout of ``scripts/quickstart.sh``: ``<root>/{data,sft,rm,ppo,eval}``."""
        root = Path(root)
        return cls(root / "data", root / "sft", root / "rm", root / "ppo", root / "eval")


@dataclass
class QuickstartResults:
    """What the report shows, read from the stages' outputs."""

    stages: list[tuple[str, Path, str]]
    """(stage, output directory, what it produced: a ``final/`` model, the data files or eval.json)."""
    num_parameters: int
    """Parameters of the SFT model (from its safetensors headers)."""
    rm_test: dict
    """The reward model's test metrics (``accuracy``, ``num_pairs``, ...)."""
    val_steps: list[int]
    val_reward: list[float]
    val_kl: list[float]
    eval_summary: dict
    """evaluate's summary (``win_rate_vs_baseline``, ``reward_mean``, ``baseline_reward_mean``, ...)."""


def require(path: Path, what: str) -> Path:
    """``path``, or a one-line :class:`DataError` naming it and the stage that should have written it."""
    if not path.exists():
        raise DataError(f"{path}: missing ({what})")
    return path


def read_field(path: Path, what: str, *fields: str):
    """``json[fields[0]][fields[1]]...`` of the JSON file ``path``; one line naming the file and field."""
    value = json.loads(require(path, what).read_text())
    for i, name in enumerate(fields):
        if not isinstance(value, dict) or name not in value:
            raise DataError(f"{path}: field {'.'.join(fields[: i + 1])!r} missing ({what})")
        value = value[name]
    return value


def count_parameters(model_dir: Path) -> int:
    """Parameters of an HF model directory, from its ``*.safetensors`` headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise DataError(f"{model_dir / 'model.safetensors'}: missing (the SFT model's weights)")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                n = 1
                for d in handle.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def validation_curves(metrics_path: Path) -> tuple[list[int], list[float], list[float]]:
    """``(steps, reward, kl)`` of PPO's validation rows (the last row of a step wins)."""
    rows = read_metrics(require(metrics_path, "the PPO run's metrics: run recipes/ppo.py first"))
    by_step = {int(r["step"]): r for r in rows if VAL_REWARD in r and VAL_KL in r}
    if not by_step:
        raise DataError(f"{metrics_path}: no rows with {VAL_REWARD!r} and {VAL_KL!r} (PPO never validated)")
    steps = sorted(by_step)
    return steps, [float(by_step[s][VAL_REWARD]) for s in steps], [float(by_step[s][VAL_KL]) for s in steps]


def collect(dirs: StageDirs) -> QuickstartResults:
    """Read every stage's outputs; the first missing file or field stops with one line naming it."""
    for split in ("train", "test"):
        for kind in ("comparisons", "prompts"):
            require(dirs.data / f"{split}_{kind}.jsonl", "download_and_process.py's output")
    stages = [
        ("download_and_process", dirs.data, str(dirs.data / "{train,test}_{comparisons,prompts}.jsonl"))
    ]
    for stage, d, recipe in (
        ("sft", dirs.sft, "sft"),
        ("reward_model", dirs.rm, "reward_model"),
        ("ppo", dirs.ppo, "ppo"),
    ):
        require(d / "final" / "config.json", f"the {stage} model: run recipes/{recipe}.py first")
        stages.append((stage, d, str(d / "final")))
    eval_json = dirs.eval / "eval.json"
    summary = read_field(eval_json, "the evaluation: run recipes/evaluate.py with --baseline", "summary")
    read_field(
        eval_json, "evaluate.py ran with --baseline none: no win rate", "summary", "win_rate_vs_baseline"
    )
    stages.append(("evaluate", dirs.eval, str(eval_json)))
    rm_test = read_field(
        dirs.rm / "eval_results.json", "the reward model's test metrics: run it with --test-data", "test"
    )
    read_field(dirs.rm / "eval_results.json", "the reward model's test accuracy", "test", "accuracy")
    steps, reward, kl = validation_curves(dirs.ppo / "metrics.jsonl")
    return QuickstartResults(
        stages, count_parameters(dirs.sft / "final"), rm_test, steps, reward, kl, summary
    )


def plot_validation(results: QuickstartResults, path: str | os.PathLike) -> Path | None:
    """PPO's validation reward and KL against the step, side by side, as a PNG at ``path`` (written
    atomically). None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    for ax, values, label in zip(
        fig.subplots(1, 2),
        (results.val_reward, results.val_kl),
        ("mean score (standardised RM reward)", "KL to the reference per sequence (nats, sampled estimate)"),
    ):
        ax.plot(results.val_steps, values, marker="o")
        ax.set_xlabel("PPO step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("PPO validation on held-out prompts")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return write_file(path, buf.getvalue())


def render(results: QuickstartResults, plot: Path | None, plot_note: str | None = None) -> str:
    """The report as markdown; ``plot`` is the PNG's path (linked relative to report.md's folder) or
    None, then ``plot_note`` says why there is none."""
    s, rm = results.eval_summary, results.rm_test
    lines = [
        "# Quickstart report",
        "",
        "## What ran",
        "",
        "| stage | output directory | produced |",
        "|---|---|---|",
    ]
    lines += [f"| {stage} | `{d}` | `{made}` |" for stage, d, made in results.stages]
    first, last = results.val_steps[0], results.val_steps[-1]
    lines += [
        "",
        "## Results",
        "",
        f"- Reward model test accuracy: {rm['accuracy']:.4f} on {rm.get('num_pairs', '?')} held-out pairs "
        "(0.5 is chance).",
        f"- PPO validation, step {first} -> {last}: mean score {results.val_reward[0]:.4f} -> "
        f"{results.val_reward[-1]:.4f}, KL to the reference {results.val_kl[0]:.4f} -> {results.val_kl[-1]:.4f}.",
        f"- Win rate of the PPO policy over the SFT policy: {s['win_rate_vs_baseline']:.4f} on "
        f"{s.get('num_prompts', '?')} test prompts (mean reward {s['reward_mean']:.4f} vs "
        f"{s.get('baseline_reward_mean', float('nan')):.4f}; ties count half).",
    ]
    if plot is not None:
        lines += ["", f"![PPO validation reward and KL]({plot.name})"]
    else:
        lines += ["", f"PPO validation curves: {plot_note or 'not plotted'}."]
    lines += ["", "## What this shows", "", honest_line(results.num_parameters, last), ""]
    return "\n".join(lines)


def honest_line(num_parameters: int, ppo_steps: int) -> str:
    """One line on what models of this size (and a PPO run of ``ppo_steps``) can and cannot show."""
    if num_parameters < TINY_PARAMETERS:
        return (
            f"These are tiny models ({num_parameters:,} parameters) trained for minutes on a CPU: the reward "
            "model can pick up surface cues of the preferred replies, but the policy cannot learn to be more "
            f"helpful or harmless and {ppo_steps} PPO steps barely move it, so a win rate near 0.5 is expected; "
            "what the run shows is the pipeline, each stage trained on the previous stage's outputs."
        )
    return (
        f"Models of {num_parameters / 1e6:,.0f}M parameters: the win rate is judged by the same reward model "
        "PPO optimised, so read it with the RM's accuracy (a policy can win by exploiting a weak RM)."
    )


def write_report(dirs: StageDirs, path: str | os.PathLike, plot: bool = True) -> tuple[str, Path]:
    """Collect, plot (``ppo_validation.png`` beside ``path``) and write the report atomically; returns
    ``(markdown, path)``."""
    results = collect(dirs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png, note = None, "not plotted (--no-plot)"
    if plot:
        png = plot_validation(results, path.with_name("ppo_validation.png"))
        note = f"not plotted: matplotlib is not installed ({PLOT_HINT})"
    text = render(results, png, note)
    write_file(path, text)
    return text, path
