"""Non-finite guard, atomic directories, checkpoint writes that fail cleanly, start_run."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhf_kit.errors import ConfigError, DiskFullError, NonFiniteError
from rlhf_kit.rollout import Rollout
from rlhf_kit.training import checkpoint as C
from rlhf_kit.training.atomic import atomic_directory, remove_directory
from rlhf_kit.training.checkpoint import latest_checkpoint, save_checkpoint
from rlhf_kit.training.guard import NonFiniteGuard, check_finite_state, nonfinite_samples
from rlhf_kit.training.optim import build_optimizer, cosine_schedule
from rlhf_kit.training.run import check_numbers, check_writable, one_line_errors, start_run
from rlhf_kit.training.step import optimizer_step

NO_ACCEL = SimpleNamespace(unscale_gradients=lambda: None)


def rollout(scores, values=None):
    b, n = len(scores), 3
    z = torch.zeros(b, n)
    return Rollout(
        sequences=torch.ones(b, 2 + n, dtype=torch.long), attention_mask=torch.ones(b, 2 + n),
        response_mask=torch.ones(b, n), logprobs=z - 1, ref_logprobs=z - 1,
        values=z if values is None else values, rewards=z, advantages=z, returns=z,
        scores=torch.tensor(scores), finished=torch.ones(b, dtype=torch.bool),
    )  # fmt: skip


def test_samples_with_nonfinite_scores_or_values_are_masked_out_and_counted():
    values = torch.zeros(3, 3)
    values[2, 1] = float("inf")
    r = rollout([0.5, float("nan"), 1.0], values)
    assert nonfinite_samples(r).tolist() == [False, True, True]
    guard = NonFiniteGuard(max_bad_steps=5)
    out = guard.drop_samples(r)
    assert out.response_mask.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.values).all()
    assert out.scores[0] == 0.5 and out.sequences.shape == r.sequences.shape  # batch size kept
    stats = guard.end_step(1)
    assert stats["nonfinite/dropped_samples"] == 2 and stats["nonfinite/bad_steps"] == 1
    assert guard.drop_samples(rollout([1.0, 2.0])).response_mask.all()  # clean rollouts pass through
    assert guard.end_step(2)["nonfinite/bad_steps"] == 1


def make_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = build_optimizer(model, lr=0.1)
    return model, opt, cosine_schedule(opt, 0, 10, 0.01)


def test_a_nonfinite_loss_is_never_applied_and_the_limit_names_step_and_quantity():
    model, opt, sched = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard = NonFiniteGuard(max_bad_steps=1)
    for step in (1, 2):
        loss = model(torch.randn(2, 4)).sum() * float("nan")
        loss.backward()
        update = optimizer_step(NO_ACCEL, model, opt, sched, 1.0, guard)
        assert math.isnan(update["grad_norm"])
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # weights untouched
        assert not opt.state  # AdamW never stepped
        logs = {"train/loss": float("nan"), "train/grad_norm": update["grad_norm"]}
        if step == 1:
            assert guard.end_step(step, logs)["nonfinite/skipped_updates"] == 1
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite grad_norm=nan \(train/loss=nan"):
        guard.end_step(2, logs)
    assert sched.last_epoch == 2  # the schedule kept its pace


def test_guarded_clip_drops_gradients_so_the_step_changes_nothing():
    model, opt, _ = make_model()
    guard = NonFiniteGuard()
    clip = guard.clip(lambda m, n: float(torch.nn.utils.clip_grad_norm_(m.parameters(), n)))
    (model(torch.randn(2, 4)).sum() * float("inf")).backward()
    assert not math.isfinite(clip(model, 1.0))
    assert all(p.grad is None for p in model.parameters())
    w = model.weight.clone()
    opt.step()
    torch.testing.assert_close(model.weight, w, rtol=0, atol=0)
    assert guard.end_step(1)["nonfinite/skipped_updates"] == 1


def test_checkpoint_and_model_writers_refuse_nonfinite_tensors(tmp_path):
    model, opt, sched = make_model()
    save_checkpoint(tmp_path, 1, models={"m": model}, optimizers={"m": opt})
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(
        NonFiniteError, match=r"checkpoint step_2 \(model 'm'\): tensor 'bias' has 1 non-finite"
    ):
        save_checkpoint(tmp_path, 2, models={"m": model})
    assert latest_checkpoint(tmp_path).name == "step_1"  # latest still points at the clean one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]  # no temp left
    with pytest.raises(NonFiniteError, match="'x' has 1 non-finite"):
        check_finite_state({"x": torch.tensor([1.0, float("inf")]), "ids": torch.tensor([1])}, "it")


def test_hf_model_writer_refuses_nan_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_kit.tiny import tiny_config
    from rlhf_kit.training.hf import save_hf_model

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="refusing to write model"):
        save_hf_model(model, tmp_path / "final")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    model, opt, _ = make_model()
    save_checkpoint(tmp_path, 1, models={"m": model})

    def full(*_a, **_k):  # what torch's zip writer says when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(DiskFullError, match=rf"disk full writing checkpoint step_2 to {tmp_path}"):
        save_checkpoint(tmp_path, 2, models={"m": model}, optimizers={"m": opt})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_1"]
    monkeypatch.undo()
    save_checkpoint(tmp_path, 2, models={"m": model})  # and the next save works
    assert latest_checkpoint(tmp_path).name == "step_2"


def test_atomic_directory_is_complete_or_absent(tmp_path, monkeypatch):
    target = tmp_path / "init" / "actor"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("")
            raise KeyboardInterrupt  # killed half-way
    assert not target.exists() and os.listdir(tmp_path / "init") == []
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"

    def enospc(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"disk full writing model to .*actor"):
        with atomic_directory(target, "model") as tmp:
            enospc()
    assert (target / "config.json").read_text() == "{}"  # the old one survives a failed replace
    remove_directory(target)
    assert os.listdir(tmp_path / "init") == []


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    import rlhf_kit.training.atomic as A

    model, _, _ = make_model()
    for s in (1, 2):
        save_checkpoint(tmp_path, s, models={"m": model}, keep_last=2)
    real_rmtree = A.shutil.rmtree

    def killed_mid_delete(path, *a, **k):  # deletes the weights, then the process dies
        (path / "models" / "m" / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(A.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, models={"m": model}, keep_last=2)
    monkeypatch.setattr(A.shutil, "rmtree", real_rmtree)
    # step_1 is gone under its real name (only a .trash- name holds the half-deleted rest)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "latest",
        "step_2",
        "step_3",
    ]
    for step in (2, 3):
        assert (tmp_path / f"step_{step}" / "models" / "m" / "model.safetensors").is_file()
    save_checkpoint(tmp_path, 4, models={"m": model}, keep_last=2)  # the next save sweeps the trash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_3", "step_4"]


def test_numbers_are_checked_finite_and_in_range():
    from dataclasses import make_dataclass

    Cfg = make_dataclass("Cfg", [("lr", float, 1e-3), ("gamma", float, 1.0), ("steps", int, 3)])
    check_numbers(Cfg(), positive=["lr", "steps"], unit_interval=["gamma"])
    for bad, msg in (
        (Cfg(lr=float("nan")), "--lr must be a finite number, got nan"),
        (Cfg(lr=float("inf")), "--lr must be a finite number, got inf"),
        (Cfg(lr=-1.0), "--lr must be > 0, got -1.0"),
        (Cfg(steps=0), "--steps must be > 0, got 0"),
        (Cfg(gamma=1.5), r"--gamma must be in \[0, 1\]"),
    ):
        with pytest.raises(ConfigError, match=msg):
            check_numbers(bad, positive=["lr", "steps"], unit_interval=["gamma"])


def test_read_only_output_directory_is_refused_up_front(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: simulate with a file in the way
            ro.chmod(0o700)
            ro = tmp_path / "file"
            ro.write_text("")
        with pytest.raises(ConfigError, match=rf"output directory {ro}.* is not writable"):
            check_writable(ro / "out" if ro.is_file() else ro)
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_one_line_errors_exit_codes(capsys):
    from tqdm import tqdm

    bar = tqdm(total=4, file=sys.stderr)
    bar.update(1)
    with pytest.raises(SystemExit) as e:
        with one_line_errors("prog"):
            raise NonFiniteError("step 3: bad\nmore")
    assert bar.disable  # closed before the message (close() disables a bar)
    assert (
        e.value.code == 1
        and capsys.readouterr().err.replace("\r", "\n").splitlines()[-1] == "prog: error: step 3: bad"
    )
    with pytest.raises(SystemExit) as e:
        with one_line_errors("prog"):
            raise ConfigError("bad flag")
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: bad flag\n"
    with pytest.raises(SystemExit) as e:
        with one_line_errors("prog", NonFiniteError):  # any full-disk OSError is one line too
            raise OSError(errno.ENOSPC, "No space left on device", "/out/metrics.jsonl")
    assert e.value.code == 1
    assert (
        capsys.readouterr().err
        == "prog: error: disk full writing /out/metrics.jsonl (No space left on device)\n"
    )
    with pytest.raises(KeyError):
        with one_line_errors("prog", NonFiniteError):
            raise KeyError("a bug keeps its traceback")


def _cfg(**kw):
    from dataclasses import make_dataclass

    Cfg = make_dataclass(
        "Cfg",
        [("lr", float, 1e-3), ("max_steps", int, 4), ("seed", int, 0), ("report_to", tuple, ("jsonl",)),
         ("val_every", int, 2)],
    )  # fmt: skip
    return Cfg(**kw)


def test_start_run_refuses_used_dirs_and_changed_settings(tmp_path):
    out = tmp_path / "run"
    assert start_run(_cfg(), out, resume=False) is None
    assert json.loads((out / "run_config.json").read_text())["config"]["lr"] == 1e-3
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(
        ConfigError, match=r"used by an earlier run \(metrics.jsonl, run_config.json\).*--overwrite"
    ):
        start_run(_cfg(), out, resume=False)
    assert start_run(_cfg(lr=5e-3), out, resume=False, overwrite=True) is None
    assert not (out / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match=r"--lr: 0.005 -> 0.001; --seed: 0 -> 1"):
        start_run(_cfg(seed=1), out, resume=True)
    start_run(_cfg(lr=5e-3, report_to=("wandb",), val_every=3), out, resume=True, may_change=["val_every"])
    with pytest.raises(ConfigError, match=r"--max-steps: 4 -> 8"):
        start_run(_cfg(lr=5e-3, max_steps=8, val_every=3), out, resume=True)
    start_run(_cfg(lr=5e-3, max_steps=8, val_every=3), out, resume=True, extend_max_steps=True)
    with pytest.raises(ConfigError, match=r"--max-steps: 8 -> 6"):  # extending never shortens
        start_run(_cfg(lr=5e-3, max_steps=6, val_every=3), out, resume=True, extend_max_steps=True)


def test_resume_accepts_a_field_newer_than_the_stored_configuration_at_its_default(tmp_path):
    """A run started by an earlier release (its run_config.json lacks a field added since) resumes while
    the new field keeps its default, and is refused when the new field is set otherwise."""
    out = tmp_path / "run"
    start_run(_cfg(), out, resume=False)
    stored = json.loads((out / "run_config.json").read_text())
    del stored["config"]["val_every"], stored["config"]["report_to"]  # fields "added after" that run
    (out / "run_config.json").write_text(json.dumps(stored))
    start_run(_cfg(), out, resume=True)  # both at their defaults (a tuple default compares as its JSON list)
    stored = json.loads((out / "run_config.json").read_text())  # the resume stored the whole config again
    assert stored["config"]["val_every"] == 2
    del stored["config"]["val_every"]
    (out / "run_config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"--val-every: None -> 3"):
        start_run(_cfg(val_every=3), out, resume=True)


def test_resume_truncates_metrics_to_what_the_checkpoint_saw(tmp_path):
    out = tmp_path / "run"
    start_run(_cfg(), out, resume=False)
    model, _, _ = make_model()
    rows = [{"step": 1}, {"step": 2}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_checkpoint(out / "checkpoints", 2, models={"m": model})
    # after the checkpoint: the final val/test rows at the same step, then a kill mid-save
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "val/loss": 1.0}\n{"step": 2, "test/loss": 1.0}\n{"step": 3, "train')
    assert start_run(_cfg(), out, resume=True).name == "step_2"
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == rows
    # no checkpoint yet (killed during the first save): the resumed run starts over with no rows
    out2 = tmp_path / "run2"
    start_run(_cfg(), out2, resume=False)
    (out2 / "metrics.jsonl").write_text('{"step": 1}\n')
    assert start_run(_cfg(), out2, resume=True) is None
    assert not (out2 / "metrics.jsonl").exists()


def test_a_killed_save_leaves_nothing_the_next_save_keeps(tmp_path):
    model, _, _ = make_model()
    (tmp_path / ".step_7.tmp" / "models").mkdir(parents=True)  # a save of step 7 killed half-way
    (tmp_path / ".tmp-final-123").mkdir()
    save_checkpoint(tmp_path, 3, models={"m": model})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_3"]
