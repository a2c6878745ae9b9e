"""Every flag of every recipe explains itself in ``--help`` (run in-process through tyro)."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parents[2]
#: recipe module -> its tyro config class
RECIPES = {
    "download_and_process": "Config",
    "sft": "Config",
    "reward_model": "Config",
    "ppo": "PPOConfig",
    "critic_server": "CriticServerConfig",
    "evaluate": "EvalConfig",
    "report": "Config",
}
FLAG_LINE = re.compile(r"^(-[^\s,]+(?:, -[^\s,]+)*)(.*)$")
BOOKKEEPING = re.compile(r"^[\s#=*-]*-{3,}")  # a section comment like "--- bookkeeping ---"


def recipe_config(name: str):
    """The config class of ``recipes/<name>.py``. The recipes folder goes at the end of the path (for
    ``_defaults``, which sft.py and reward_model.py import as when run), so that an installed package
    named like a recipe (``evaluate``) still wins."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if str(ROOT / "recipes") not in sys.path:
        sys.path.append(str(ROOT / "recipes"))
    return getattr(importlib.import_module(f"recipes.{name}"), RECIPES[name])


def help_text(config, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        tyro.cli(config, args=["--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def recipe_options(name: str) -> set[str]:
    """Every option string of ``recipes/<name>.py`` (``--flag`` and ``--no-flag`` forms), from its help."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            tyro.cli(recipe_config(name), args=["--help"])
    finally:
        os.environ.pop("COLUMNS") if old is None else os.environ.__setitem__("COLUMNS", old)
    options = set()
    for line in out.getvalue().splitlines():
        match = FLAG_LINE.match(line[2:]) if line.startswith("  -") else None
        if match:
            options.update(match.group(1).split(", "))
    return options


def flag_descriptions(text: str) -> dict[str, str]:
    """``{--flag: description}`` from tyro's help as printed to a pipe: a flag line indented by two
    spaces (metavar, then the description after two spaces), then deeper-indented continuation lines."""
    flags: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = FLAG_LINE.match(line[2:]) if line.startswith("  -") else None
        if match:
            current = match.group(1).split(", ")[0]
            rest = match.group(2)  # the metavar ends at the first run of two spaces
            flags[current] = rest.split("  ", 1)[1].strip() if "  " in rest else ""
        elif current and line.startswith(" " * 8) and line.strip():
            flags[current] += " " + line.strip()
        else:  # a blank line, a group title or its rule of dashes ends the flag
            current = None
    return {k: re.sub(r"\((default: .*?|required)\)$", "", v.strip()).strip() for k, v in flags.items()}


def test_parser_reads_descriptions_and_flags_missing_ones():
    text = (
        " options\n"
        " -------------------------------------------\n"
        "  --with-desc INT   Steps to train. (default: 3)\n"
        "  --wrapped {None}|STR\n"
        "                    A long one (see --x). (default: None)\n"
        "  --bare [STR [STR ...]]\n"
        "                    (default: )\n"
        "  --flag, --no-flag  (default: False)\n"
        "\n"
        " group options\n"
        " -------------------------------------------\n"
        "  --last FLOAT\n"
    )
    assert flag_descriptions(text) == {
        "--with-desc": "Steps to train.",
        "--wrapped": "A long one (see --x).",
        "--bare": "",
        "--flag": "",
        "--last": "",
    }


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_flag_has_a_description(name, monkeypatch):
    flags = flag_descriptions(help_text(recipe_config(name), monkeypatch))
    flags.pop("-h")
    assert len(flags) >= 8, f"{name}: too few flags parsed from --help: {sorted(flags)}"
    missing = sorted(flag for flag, desc in flags.items() if not desc)
    assert not missing, f"recipes/{name}.py: flags without a description: {missing}"
    comments = sorted(flag for flag, desc in flags.items() if BOOKKEEPING.match(desc))
    assert not comments, f"recipes/{name}.py: a section comment became the help of {comments}"
