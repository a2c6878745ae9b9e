"""The embedded default shared by the recipes: a tiny model and the shipped HH sample, all offline.

With no ``--model`` a recipe builds a random-init tiny llama plus a byte-level BPE tokenizer trained
on the shipped HH sample (``rlhf_kit.tiny``) and saves them as an HF directory under the output
directory; with no data it splits the shipped HH sample into train/test comparison files there.
Rank 0 writes, the other ranks wait.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_kit.training import barrier, is_main_process

#: Learning rate used when none is given and the recipe trains the embedded tiny model from scratch.
TINY_LR = 1e-3
#: Learning rate used when none is given for a user model (fine-tuning a pretrained checkpoint).
PRETRAINED_LR = 1e-5
#: Sequence length limit for the embedded default (HH dialogues are median ~220 tiny-BPE tokens).
TINY_MAX_LENGTH = 256
#: Sequence length limit when none is given for a user model.
PRETRAINED_MAX_LENGTH = 1024


def default_model(output_dir: Path, kind: str, seed: int = 0) -> str:
    """Path of the embedded tiny model (``kind``: ``"reward"`` or ``"causal_lm"``), created if missing."""
    from rlhf_kit.tiny import save_tiny_pretrained
    from rlhf_kit.training.atomic import atomic_directory

    path = Path(output_dir) / f"tiny_{kind}"
    if is_main_process() and not (path / "config.json").is_file():
        with atomic_directory(path, f"the embedded tiny {kind} model") as tmp:  # complete or absent
            save_tiny_pretrained(str(tmp), kind=kind, family="llama", seed=seed)
    barrier()
    return str(path)


def default_data(output_dir: Path) -> dict[str, str]:
    """Train/test comparison and prompt files of the shipped HH sample under ``<output_dir>/data``."""
    from rlhf_kit.data.hh import prepare_default_hh

    data_dir = Path(output_dir) / "data"
    names = ("train_comparisons", "train_prompts", "test_comparisons", "test_prompts")
    paths = {n: str(data_dir / f"{n}.jsonl") for n in names}
    if is_main_process() and not all(Path(p).is_file() for p in paths.values()):
        data_dir.mkdir(parents=True, exist_ok=True)
        paths = prepare_default_hh(data_dir)
    barrier()
    return paths
