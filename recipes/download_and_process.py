"""Prepare Anthropic HH-RLHF as comparison and prompt files (the NeMo-Aligner JSONL format).

Writes ``{split}_comparisons.jsonl`` (``{"text": prompt + response}`` per line, chosen line directly
before its rejected line) and ``{split}_prompts.jsonl`` (``{"text": prompt}``) into ``--output-dir``,
atomically, and prints how many pairs were dropped and why.

    python recipes/download_and_process.py                      # Anthropic/hh-rlhf from the hub
    python recipes/download_and_process.py --source default     # the sample shipped in rlhf_kit, offline
    python recipes/download_and_process.py --source hh-rlhf/    # a folder of the release's *.jsonl.gz
    python recipes/download_and_process.py --source harmless-base-test.jsonl.gz   # one file (split: test)
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from rlhf_kit.data.hh import (
    DropCounts,
    prepare_default_hh_with_counts,
    process_hh_file,
    process_hh_records,
    write_split,
)
from rlhf_kit.training.summary import print_summary

SPLITS = ("train", "test")


@dataclass
class Config:
    """Prepare Anthropic HH-RLHF comparison and prompt files."""

    source: str | None = None
    """Where HH comes from. Unset: load `--dataset` from the hub through `datasets`. "default": the
    2,312-pair sample shipped in rlhf_kit, split into train/test offline (`--test-fraction`, `--seed`).
    A folder: every `*.jsonl.gz` / `*.jsonl` comparison file under it, split by file name (`*test*` ->
    test, else train). A file: one split, from `--split` or the file name."""

    dataset: str = "Anthropic/hh-rlhf"
    """Hub dataset loaded when `--source` is unset."""

    hub_data_dir: str | None = None
    """Subset folder of the hub dataset (e.g. `harmless-base`); unset loads all subsets."""

    output_dir: Path = Path("data/hh")
    """Folder the `{train,test}_comparisons.jsonl` and `{train,test}_prompts.jsonl` files go to."""

    split: Literal["train", "test"] | None = None
    """Split of a single `--source` file; unset: `test` if the file name contains "test", else `train`."""

    keep_human: bool = False
    """Keep the original `Human:` label for user turns instead of rewriting it to `User:` (text format)."""

    format: Literal["text", "messages"] = "text"
    """text: `User:`/`Assistant:` strings (NeMo `{"text"}` lines; any tokenizer). messages: chat messages
    (`{"prompt": [...], "chosen", "rejected"}` and `{"messages": [...]}` lines) that the recipes render
    with the model's chat template: use this for instruct models, so they see their own format."""

    test_fraction: float = 0.1
    """With `--source default`: fraction of the shipped pairs, in (0, 1), that goes to the test split."""

    seed: int = 0
    """With `--source default`: seed of the deterministic train/test split."""


def split_of(path: Path, split: str | None) -> str:
    """The split of one source file: the explicit one, else from its name."""
    return split or ("test" if "test" in path.name else "train")


def is_comparison_file(path: Path) -> bool:
    """Whether the first record of a release file has ``chosen`` and ``rejected`` (red-team files do not)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return True  # let the processing count it as a bad record
                return isinstance(record, dict) and "chosen" in record and "rejected" in record
    return False


def source_files(source: Path, split: str | None) -> dict[str, list[Path]]:
    """Comparison files of a local source grouped by split."""
    if source.is_file():
        return {split_of(source, split): [source]}
    if not source.is_dir():
        raise SystemExit(f"--source {source}: no such file or folder")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith((".jsonl.gz", ".jsonl")))
    groups: dict[str, list[Path]] = {}
    for p in files:
        if not is_comparison_file(p):
            print(f"skipping {p}: not a chosen/rejected comparison file")
            continue
        groups.setdefault(split_of(p, split), []).append(p)
    if not groups:
        raise SystemExit(f"--source {source}: no *.jsonl.gz / *.jsonl comparison files found")
    return groups


def process_local(cfg: Config) -> dict[str, tuple[list, list, DropCounts]]:
    """Read a local file or folder into per-split (comparisons, prompts, counts)."""
    out: dict[str, tuple[list, list, DropCounts]] = {}
    for split, files in source_files(Path(cfg.source), cfg.split).items():
        comparisons, prompts, counts = [], [], DropCounts()
        for path in files:
            c, p, n = process_hh_file(path, cfg.keep_human, cfg.format == "messages")
            print(f"{path}: {n}")
            comparisons += c
            prompts += p
            counts.update(n)
        out[split] = (comparisons, prompts, counts)
    return out


def process_hub(cfg: Config) -> dict[str, tuple[list, list, DropCounts]]:
    """Load the hub dataset through ``datasets`` into per-split (comparisons, prompts, counts)."""
    from rlhf_kit.data.hub import load_hub_dataset

    dd = load_hub_dataset(cfg.dataset, cfg.hub_data_dir)  # one line naming --source when out of reach
    messages = cfg.format == "messages"
    return {
        split: process_hh_records(iter(dd[split]), cfg.keep_human, messages)
        for split in SPLITS
        if split in dd
    }


def main(cfg: Config) -> dict[str, str]:
    """Run the preparation; returns the written paths by ``{split}_{kind}`` key."""
    if cfg.source == "default":
        paths, counts = prepare_default_hh_with_counts(
            cfg.output_dir, cfg.test_fraction, cfg.seed, cfg.keep_human, cfg.format == "messages"
        )
        print(f"shipped HH sample: {counts}")
    else:
        per_split = process_hub(cfg) if cfg.source is None else process_local(cfg)
        paths = {}
        for split in SPLITS:
            if split not in per_split:
                print(f"source has no {split} split: no {split}_* files written")
                continue
            comparisons, prompts, counts = per_split[split]
            print(f"{split}: {counts}")
            paths.update(write_split(cfg.output_dir, split, comparisons, prompts))
    print_summary("download_and_process", {k.replace("_", " "): paths[k] for k in sorted(paths)})
    return paths


if __name__ == "__main__":
    from rlhf_kit.training.run import one_line_errors

    config = tyro.cli(Config)
    with one_line_errors("download_and_process.py"):  # bad input or an unreachable hub: one line
        main(config)
