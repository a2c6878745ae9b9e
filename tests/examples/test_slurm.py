"""The Slurm templates of examples/slurm: valid bash, and every flag they pass exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from rlhf_kit.serving.client import TOKEN_ENV
from tests.recipes.test_help import RECIPES, recipe_options

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
RECIPE = re.compile(r"recipes/(\w+)\.py")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def commands(text: str) -> list[str]:
    """Logical lines: backslash-continued lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def used_flags(text: str) -> list[tuple[str, str, str]]:
    """``(program, flag, command)`` for each flag given to a recipe (``recipes/<name>.py``) or to
    ``accelerate launch`` (``accelerate``) in ``text``."""
    found = []
    for line in commands(text):
        for match in RECIPE.finditer(line):
            rest = line[match.end() :]
            following = RECIPE.search(rest)
            rest = rest[: following.start()] if following else rest
            found += [(match.group(1), flag, line.strip()) for flag in FLAG.findall(rest)]
            head = line[: match.start()]
            if "accelerate launch" in head:
                launch = head.split("accelerate launch", 1)[1]
                found += [("accelerate", flag, line.strip()) for flag in FLAG.findall(launch)]
    return found


def accelerate_options() -> set[str]:
    return {opt for action in launch_command_parser()._actions for opt in action.option_strings}


def test_flag_parser_sees_recipe_and_launcher_flags():
    text = (
        "srun bash -c 'accelerate launch --num_processes 8 \\\n"
        "    recipes/sft.py --model m \\\n"
        "    --not-a-flag-of-sft 1'\n"
        "# recipes/ppo.py --commented-out\n"
        "python recipes/ppo.py --actor a\n"
    )
    assert [(p, f) for p, f, _ in used_flags(text)] == [
        ("sft", "--model"),
        ("sft", "--not-a-flag-of-sft"),
        ("accelerate", "--num_processes"),
        ("ppo", "--actor"),
    ]


def test_templates_exist_and_are_valid_bash():
    assert {p.name for p in SCRIPTS} >= {"fsdp_multinode.sbatch", "ppo_critic_server.sbatch"}
    for path in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_flag_in_a_template_exists(path):
    used = used_flags(path.read_text())
    assert used, f"{path.name} runs no recipe"
    known = {"accelerate": accelerate_options()}
    for program in {p for p, _, _ in used} - {"accelerate"}:
        assert program in RECIPES, f"{path.name}: recipes/{program}.py is not a recipe"
        known[program] = recipe_options(program)
    unknown = sorted({(p, f) for p, f, _ in used if f not in known[p]})
    assert not unknown, f"{path.name}: flags that do not exist: {unknown}"
    for config in re.findall(r"--config_file\s+(\S+)", path.read_text()):
        assert (ROOT / config).is_file(), f"{path.name}: {config} does not exist"


def test_multinode_and_heterogeneous_layouts():
    fsdp = (ROOT / "examples" / "slurm" / "fsdp_multinode.sbatch").read_text()
    flags = {f for _, f, _ in used_flags(fsdp)}
    assert {"--num_machines", "--num_processes", "--machine_rank", "--main_process_ip"} <= flags
    assert "recipes/accelerate/fsdp.yaml" in fsdp

    het = (ROOT / "examples" / "slurm" / "ppo_critic_server.sbatch").read_text()
    assert "#SBATCH hetjob" in het and "--het-group=0" in het and "--het-group=1" in het
    assert f"export {TOKEN_ENV}=" in het and "--auth-token" not in het  # the token travels in the environment
    server = [c for c in commands(het) if "recipes/critic_server.py" in c]
    actor = [c for c in commands(het) if "recipes/ppo.py" in c]
    assert len(server) == 1 and "--het-group=0" in server[0] and "--host 0.0.0.0" in server[0]
    assert len(actor) == 1 and "--het-group=1" in actor[0] and "--critic-server" in actor[0]
    # the two sides must agree on what recipes/ppo.py checks against the server
    assert '--value-clip "$VALUE_CLIP"' in server[0] and "--value-clip $VALUE_CLIP" in actor[0]
    assert '--total-steps "$TOTAL_STEPS"' in server[0]
    assert "TOTAL_STEPS=$((MAX_STEPS * PPO_EPOCHS * ROLLOUT / GLOBAL_BATCH))" in het
