"""The quickstart's closing report: what ran, the RM's test accuracy, PPO's validation curves, the win rate.

    python recipes/report.py                                # after bash scripts/quickstart.sh
    python recipes/report.py --root out --ppo-dir out/ppo-long

Reads each stage's outputs under --root (the layout of scripts/quickstart.sh), prints the report and
writes ``<root>/report.md`` and ``<root>/ppo_validation.png`` (matplotlib: ``pip install
'rlhf-kit[plot]'``; without it the report says so and gives the rest). A missing stage output stops
with one line naming the file.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tyro


@dataclass
class Config:
    """The quickstart report. Every field is a command-line flag."""

    root: Path = Path("outputs/quickstart")
    """Output root of scripts/quickstart.sh; the stage folders below default to <root>/<stage>."""
    data_dir: Path | None = None
    """download_and_process.py's output ({train,test}_{comparisons,prompts}.jsonl). None: <root>/data."""
    sft_dir: Path | None = None
    """sft.py's --output-dir (its final/ model is the baseline of the win rate). None: <root>/sft."""
    rm_dir: Path | None = None
    """reward_model.py's --output-dir (final/ and eval_results.json with test accuracy). None: <root>/rm."""
    ppo_dir: Path | None = None
    """ppo.py's --output-dir (final/ and metrics.jsonl with the validation rows). None: <root>/ppo."""
    eval_dir: Path | None = None
    """evaluate.py's --output-dir (eval.json, run with an SFT --baseline). None: <root>/eval."""
    output: Path | None = None
    """Where report.md goes; ppo_validation.png is written beside it. None: <root>/report.md."""
    plot: bool = True
    """Save PPO's validation reward and KL curves as ppo_validation.png (needs matplotlib)."""


def main(cfg: Config) -> str:
    from rlhf_kit.report import StageDirs, write_report

    # 1. The stage folders: --root's layout unless a flag points elsewhere.
    default = StageDirs.under(cfg.root)
    dirs = StageDirs(
        data=cfg.data_dir or default.data, sft=cfg.sft_dir or default.sft, rm=cfg.rm_dir or default.rm,
        ppo=cfg.ppo_dir or default.ppo, eval=cfg.eval_dir or default.eval,
    )  # fmt: skip

    # 2. Read every stage's outputs (one line naming a missing file), plot, write and print the report.
    text, path = write_report(dirs, cfg.output or cfg.root / "report.md", plot=cfg.plot)
    print(text)
    print(f"wrote {path}")
    return text


if __name__ == "__main__":
    from rlhf_kit.training.run import one_line_errors

    config = tyro.cli(Config)
    with one_line_errors("report.py"):  # a missing stage output or a bad file: one line naming it
        main(config)
