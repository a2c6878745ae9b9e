"""recipes/critic_server.py as a subprocess, with recipes/ppo.py --critic-server pointing at it."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf_kit.serving import RemoteCritic
from rlhf_kit.tiny import save_tiny_pretrained
from tests.recipes.procs import run_bad_configurations

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **{k: v for k, v in os.environ.items() if k != "RLHF_KIT_SERVER_TOKEN"},
    "PYTHONPATH": str(ROOT),
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
PROMPTS = ["Human: How do I bake bread?\n\nAssistant:", "Human: What is a prime number?\n\nAssistant:",
           "Human: Tell me a joke.\n\nAssistant:", "Human: Why is the sky blue?\n\nAssistant:"]  # fmt: skip
# 2 steps x (4 samples / global batch 2) = 4 optimizer steps: the server's --total-steps
PPO_ARGS = ["--max-steps", "2", "--num-rollout-samples", "4", "--global-batch-size", "2", "--micro-batch-size",
            "1", "--rollout-micro-batch-size", "4", "--max-new-tokens", "6", "--num-val-samples", "2",
            "--val-check-interval", "2", "--save-interval", "1", "--critic-lr", "1e-3", "--mixed-precision", "no"]  # fmt: skip


TOKEN_ENV = {**ENV, "RLHF_KIT_SERVER_TOKEN": "recipe-test-token"}


def start_server(out: Path, *args: str, env: dict = ENV) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port (--port 0) and read the URL it prints."""
    log = out / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "recipes" / "critic_server.py"), "--port", "0", "--output-dir",
             str(out / "server"), "--mixed-precision", "no", *args],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        found = re.search(r"listening on (http://\S+)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    raise AssertionError(f"critic server did not start:\n{log.read_text()[-3000:]}")


def ppo(out: Path, *args: str, env: dict = ENV) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "ppo.py"), "--output-dir", str(out), *PPO_ARGS, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_recipe_with_a_critic_server(tmp_path, tokenizer):
    """2 PPO steps with the critic and RM on a server equal the same run with all four models local
    (metrics and final weights), the server writes its critic, and resume reloads the server's state.
    Both sides read the shared token from RLHF_KIT_SERVER_TOKEN."""
    actor = save_tiny_pretrained(str(tmp_path / "actor"), "causal_lm", tokenizer=tokenizer, seed=0)
    rm = save_tiny_pretrained(str(tmp_path / "rm"), "reward", tokenizer=tokenizer, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    data = ["--actor", actor, "--train-prompts", str(prompts), "--val-prompts", str(prompts)]
    local = ppo(tmp_path / "local", *data, "--reward-model", rm)  # runs while the server starts
    procs = [local]
    try:
        server, url = start_server(
            tmp_path, "--reward-model", rm, "--total-steps", "4", "--lr", "1e-3", env=TOKEN_ENV
        )
        procs.append(server)
        assert "(token required)" in (tmp_path / "server.log").read_text()
        # the local run and the run against the server are independent: they run at once (2 cores)
        remote_run = ppo(tmp_path / "ppo", *data, "--critic-server", url, env=TOKEN_ENV)
        procs.append(remote_run)
        finish(local)
        finish(remote_run)
        rows = [r for r in metrics(tmp_path / "ppo") if "value/loss" in r]
        assert len(rows) == 2
        for r in rows:
            for key in ("value/loss", "value/grad_norm", "value/mean", "lr/critic", "reward/score_mean"):
                assert math.isfinite(r[key]), (key, r)
        local_rows = [r for r in metrics(tmp_path / "local") if "value/loss" in r]
        for key in ("value/loss", "value/grad_norm", "policy/loss", "reward/score_mean", "lr/critic"):
            assert [r[key] for r in rows] == pytest.approx(
                [r[key] for r in local_rows], rel=1e-6, abs=1e-9
            ), key
        # the server trained and wrote its critic, equal to the local run's; the actor job holds no critic
        served = tmp_path / "server"
        final = AutoModelForSequenceClassification.from_pretrained(served / "final" / "critic").state_dict()
        init = AutoModelForSequenceClassification.from_pretrained(rm).state_dict()
        same = AutoModelForSequenceClassification.from_pretrained(tmp_path / "local" / "critic").state_dict()
        assert any(not torch.equal(p, init[n]) for n, p in final.items())
        for name, p in final.items():
            torch.testing.assert_close(p, same[name], rtol=1e-5, atol=1e-7)
        assert sorted(p.name for p in (served / "checkpoints").iterdir()) == ["step_1", "step_2"]
        assert not (tmp_path / "ppo" / "critic").exists()
        assert not (tmp_path / "ppo" / "checkpoints" / "step_2" / "models" / "critic").exists()

        # resume from step 1 against the same server: it reloads its step-1 state, so step 2 repeats
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "ppo" / "checkpoints" / "step_1", resumed / "checkpoints" / "step_1")
        (resumed / "checkpoints" / "latest").write_text("step_1\n")
        finish(ppo(resumed, *data, "--critic-server", url, "--resume", env=TOKEN_ENV))
        again = [r for r in metrics(resumed) if "value/loss" in r]
        for key in ("value/loss", "value/grad_norm", "policy/loss", "reward/score_mean", "lr/critic"):
            assert again[-1][key] == pytest.approx(rows[-1][key], rel=1e-6, abs=1e-9), key
        refinal = AutoModelForSequenceClassification.from_pretrained(served / "final" / "critic").state_dict()
        for name, p in final.items():
            torch.testing.assert_close(refinal[name], p, rtol=0, atol=0)

        # an actor job of 2 ranks (DDP over gloo): each rank sends its share, one update per global batch
        remote = RemoteCritic(url, token=TOKEN_ENV["RLHF_KIT_SERVER_TOKEN"])
        before = remote.health()["train_calls"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        two = subprocess.run(
            [*launcher, str(ROOT / "recipes" / "ppo.py"), "--output-dir", str(tmp_path / "ddp"), *PPO_ARGS, *data,
             "--critic-server", url],
            cwd=ROOT, env={**TOKEN_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert two.returncode == 0, two.stderr[-3000:]
        rows = [r for r in metrics(tmp_path / "ddp") if "value/loss" in r]
        assert len(rows) == 2 and all(math.isfinite(r["value/loss"]) for r in rows)
        assert remote.health()["train_calls"] == before + 2  # 2 steps, not 2 steps x 2 ranks
    finally:  # the server always goes, whatever failed
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)


BAD_CONFIGURATIONS = [
    (["--critic", "/nonexistent/critic"], "/nonexistent/critic"),
    (["--warmup-steps", "9", "--total-steps", "8"], "--warmup-steps 9 must be in [0, --total-steps 8]"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], "--min-lr 0.001 is larger than --lr 0.0001"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not loopback: set --auth-token or RLHF_KIT_SERVER_TOKEN"),
]


@pytest.fixture(scope="module")
def bad_configuration_runs(tmp_path_factory):
    """Every case of test_bad_server_configuration_stops_with_one_line, each its own CLI process, started
    at once (each is ~7 s of imports on one core): ``{args: (CompletedProcess, output dir)}``."""
    return run_bad_configurations(
        ROOT / "recipes" / "critic_server.py",
        BAD_CONFIGURATIONS,
        tmp_path_factory.mktemp("server_bad"),
        env=ENV,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("args,message", BAD_CONFIGURATIONS)
def test_bad_server_configuration_stops_with_one_line(bad_configuration_runs, args, message):
    proc, out = bad_configuration_runs[tuple(args)]
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and message in err[0], proc.stderr
    assert not out.exists()  # nothing was built or loaded
