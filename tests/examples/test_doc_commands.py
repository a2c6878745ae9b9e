"""The recipe commands in the docs (docs/*.md and README.md code blocks) only pass flags that exist,
checked against each recipe's parser as tests/examples/test_slurm.py checks the Slurm templates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.examples.test_slurm import accelerate_options, used_flags
from tests.recipes.test_help import RECIPES, recipe_options

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
TRAILING_COMMENT = re.compile(r"\s+#\s.*$", re.M)  # "cmd --flag x   # a note" -> "cmd --flag x"


def code_blocks(text: str) -> str:
    """Every fenced code block of a Markdown page, trailing shell comments removed."""
    return "\n".join(TRAILING_COMMENT.sub("", block) for block in FENCE.findall(text))


def test_code_blocks_are_found_and_comments_dropped():
    page = (
        "Run `python recipes/ppo.py --in-prose` first.\n\n```bash\n"
        "python recipes/sft.py --model m \\\n    --max-steps 5   # or --not-this\n```\n"
    )
    assert [(p, f) for p, f, _ in used_flags(code_blocks(page))] == [
        ("sft", "--model"),
        ("sft", "--max-steps"),
    ]


def test_the_tutorial_runs_every_stage():
    used = used_flags(code_blocks((ROOT / "docs" / "tutorial.md").read_text()))
    programs = {p for p, _, _ in used}
    assert {"download_and_process", "sft", "reward_model", "critic_server", "ppo", "evaluate"} <= programs
    assert ("ppo", "--critic-server") in {(p, f) for p, f, _ in used}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_flag_in_the_docs_exists(page):
    used = used_flags(code_blocks(page.read_text()))
    known = {"accelerate": accelerate_options()} if any(p == "accelerate" for p, _, _ in used) else {}
    for program in {p for p, _, _ in used} - {"accelerate"}:
        assert program in RECIPES, f"{page.name}: recipes/{program}.py is not a recipe"
        known[program] = recipe_options(program)
    unknown = sorted({(p, f, cmd) for p, f, cmd in used if f not in known[p]})
    assert not unknown, f"{page.name}: flags that do not exist: {unknown}"


def test_the_readme_module_table_names_only_what_each_module_exports():
    """Every backticked name in a row of the README's ``| `rlhf_kit.x` | ... |`` table imports from that
    module (``datasets``, the library, is the one word there that is not an API name)."""
    import importlib

    rows = re.findall(r"^\| `(rlhf_kit[\w.]*)` \| (.*)\|\s*$", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 10
    missing = [
        (module, name)
        for module, text in rows
        for name in re.findall(r"`([A-Za-z_]\w*)`", text)
        if name != "datasets" and not hasattr(importlib.import_module(module), name)
    ]
    assert not missing, missing
