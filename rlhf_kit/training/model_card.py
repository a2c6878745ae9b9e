"""A hub-style model card (``README.md``) for the ``final/`` directory of a training recipe.

The YAML front matter (``base_model``, ``library_name``, ``tags``, ``datasets``, ``pipeline_tag``) is
rendered by ``huggingface_hub.ModelCardData``, so the hub reads it as it reads its own cards; the
body gives the data, how the model was trained, the final metrics, every hyper-parameter and the
command that made it. The main process writes it atomically (temp file, then ``os.replace``).

Only hub ids go into the front matter (the hub rejects local paths there): a local ``base_model``
that carries a card of its own (an SFT model trained by these recipes) passes on that card's
``base_model``; other local paths are named in the body only. The recipes' embedded default data
(files under ``<output_dir>/data``, cut from the HH sample shipped in rlhf_kit) counts as
``Anthropic/hh-rlhf``.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlhf_kit.training import dist as D

CARD = "README.md"
HH = "Anthropic/hh-rlhf"

#: Per recipe: (pipeline tag, tags, the config field of the starting model, data fields, how it trains).
RECIPES: dict[str, tuple[str, list[str], str, tuple[str, ...], str]] = {
    "sft": (
        "text-generation",
        ["sft"],
        "model",
        ("train_data", "val_data", "test_data"),
        "Supervised fine-tuning of a causal LM with the cross-entropy loss on response tokens only "
        "(prompt tokens masked), AdamW with a cosine learning-rate schedule (rlhf_kit recipes/sft.py).",
    ),
    "reward_model": (
        "text-classification",
        ["reward-model", "reward-trainer"],
        "model",
        ("train_data", "val_data", "test_data"),
        "A causal LM with a new linear score head read at the last real token "
        "(AutoModelForSequenceClassification, one label), trained with the pairwise Bradley-Terry loss "
        "-logsigmoid(r_chosen - r_rejected - margin) on chosen/rejected pairs; reward_stats.json holds "
        "the mean and std of validation rewards for standardising PPO scores "
        "(rlhf_kit recipes/reward_model.py).",
    ),
    "ppo": (
        "text-generation",
        ["ppo", "rlhf"],
        "actor",
        ("train_prompts", "val_prompts"),
        "PPO (Schulman et al. 2017) with four models: this actor, a critic, a frozen reference (the "
        "starting model) and a reward model or function. Each step samples responses, shapes the reward "
        "as a per-token KL penalty plus the score on the last token, estimates advantages with GAE and "
        "takes clipped policy and value updates (rlhf_kit recipes/ppo.py).",
    ),
}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process: ``python recipes/x.py ...``, or ``accelerate launch
    --num_processes N recipes/x.py ...`` when a launcher started ``WORLD_SIZE`` > 1 processes."""
    argv = list(sys.argv if argv is None else argv)
    world = D.env_world_size()
    launcher = f"accelerate launch --num_processes {world}" if world > 1 else "python"
    return f"{launcher} {shlex.join(argv)}"


def card_base_model(path: str | None) -> str | None:
    """The hub id to name as ``base_model``: ``path`` itself if it is not a local directory, else the
    ``base_model`` of the card in it (``None`` without one)."""
    if not path:
        return None
    card = Path(path) / CARD
    if not Path(path).exists():
        return path
    if card.is_file():
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.base_model
    return None


def hub_datasets(paths: Sequence[str], output_dir: str | None) -> list[str]:
    """Hub ids among ``paths``; files of the embedded default (under ``<output_dir>/data``) count as HH."""
    out: list[str] = []
    default_dir = Path(output_dir, "data").resolve() if output_dir else None
    for p in paths:
        if not Path(p).exists():
            name = p
        elif default_dir is not None and Path(p).resolve().parent == default_dir:
            name = HH
        else:
            continue
        if name not in out:
            out.append(name)
    return out


def _table(rows: Mapping[str, object], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    for k, v in rows.items():
        value = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"| {k} | `{value}` |".replace("\n", " "))
    return "\n".join(lines)


def render_model_card(
    recipe: str,
    config: Mapping[str, object],
    metrics: Mapping[str, object],
    command: str | None = None,
) -> str:
    """The card's text for a run of ``recipe`` (``"sft"``, ``"reward_model"``, ``"ppo"``) with the
    recipe's ``config`` (its fields as a dict) and final ``metrics`` (flat ``{name: number}``)."""
    from huggingface_hub import ModelCardData

    import rlhf_kit

    if recipe not in RECIPES:
        raise ValueError(f"model card: unknown recipe {recipe!r} (one of {sorted(RECIPES)})")
    pipeline, tags, model_field, data_fields, how = RECIPES[recipe]
    start = config.get(model_field)
    data = [str(config[f]) for f in data_fields if config.get(f)]
    output_dir = str(config["output_dir"]) if config.get("output_dir") else None
    front = ModelCardData(
        base_model=card_base_model(str(start) if start else None),
        library_name="transformers",
        pipeline_tag=pipeline,
        tags=["rlhf_kit", *tags],
        datasets=hub_datasets(data, output_dir) or None,
    )
    import torch
    import transformers

    world = D.env_world_size()
    sections = [
        f"---\n{front.to_yaml()}\n---",
        f"# {Path(output_dir or '.').name} ({recipe.replace('_', ' ')}, rlhf_kit)",
        f"Starting model: `{start}`.",
        "## Data\n"
        + (
            "\n".join(
                f"- `{f}` (--{f.replace('_', '-')}): `{config[f]}`" for f in data_fields if config.get(f)
            )
            or "- none recorded"
        ),  # fmt: skip
        f"## How it was trained\n{how}\n\n{world} process(es); rlhf_kit {rlhf_kit.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}.",
        "## Metrics\n" + (_table(metrics, ("metric", "value")) if metrics else "None recorded."),
        "## Hyper-parameters\n"
        + _table({f"--{k.replace('_', '-')}": v for k, v in config.items()}, ("flag", "value")),
        f"## Command\n```bash\n{command or command_line()}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(
    final_dir: str | Path,
    recipe: str,
    config: Mapping[str, object],
    metrics: Mapping[str, object],
    command: str | None = None,
) -> Path | None:
    """Write :func:`render_model_card` to ``<final_dir>/README.md`` atomically on the main process
    (returns the path there, ``None`` elsewhere). ``metrics`` may be nested one level (``{"val":
    {"loss": ...}}`` becomes ``val/loss``); non-numbers are left out."""
    if not D.is_main_process():
        return None
    flat: dict[str, object] = {}
    for k, v in metrics.items():
        for name, value in v.items() if isinstance(v, Mapping) else [(None, v)]:
            if isinstance(value, int | float) and not isinstance(value, bool):
                flat[f"{k}/{name}" if name is not None else k] = value
    text = render_model_card(recipe, config, flat, command)
    path = Path(final_dir) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
