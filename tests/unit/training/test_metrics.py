import json
import sys
import time
import types

import pytest
import torch

from rlhf_kit.training import dist as D
from rlhf_kit.training.metrics import MetricsLogger, StepTimer, progress, read_metrics


def test_jsonl_one_object_per_call(tmp_path):
    with MetricsLogger(tmp_path / "out") as logger:
        logger.log({"train/loss": torch.tensor(0.5), "lr": 1e-3, "bad": float("nan")}, step=1)
        logger.log({"val/accuracy": 0.75}, step=2)
        logger.log_table("samples", [["hi", 1.0]], columns=["text", "reward"], step=2)
        with pytest.raises(ValueError, match="2 columns"):
            logger.log_table("samples", [["only one"]], columns=["text", "reward"])
    rows = read_metrics(tmp_path / "out")
    assert rows[0] == {"step": 1, "train/loss": 0.5, "lr": 1e-3, "bad": "nan"}
    assert rows[1] == {"step": 2, "val/accuracy": 0.75}
    assert rows[2]["table"] == "samples" and rows[2]["rows"] == [["hi", 1.0]]
    # appending on resume
    with MetricsLogger(tmp_path / "out") as logger:
        logger.log({"x": 1}, step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1, 2, 2, 3]


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "rank", lambda: 1)
    logger = MetricsLogger(tmp_path / "r1", report_to=("jsonl", "tensorboard"))
    logger.log({"a": 1}, step=1)
    logger.log_table("t", [[1]], ["c"])
    logger.close()
    assert not (tmp_path / "r1").exists()
    assert progress(range(3)).disable


def test_tensorboard_backend_writes_events(tmp_path):
    logger = MetricsLogger(tmp_path, report_to="tensorboard", config={"lr": 1e-3})
    logger.log({"train/loss": 1.0, "note": "text is skipped"}, step=1)
    logger.log_table("samples", [["a|b", 2]], ["text", "n"], step=1)
    logger.close()
    logger.close()  # idempotent
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert read_metrics(tmp_path)[0]["note"] == "text is skipped"


def test_wandb_backend_offline_calls(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, report_to=["wandb"], project="p", run_name="r", config={"a": 1})
    logger.log({"loss": 2.0, "s": "x"}, step=5)
    logger.log_table("samples", [["t", 1]], ["text", "r"], step=5)
    logger.close()
    init = calls[0][1]
    assert init["project"] == "p" and init["name"] == "r" and init["config"] == {"a": 1}
    assert init["dir"] == str(tmp_path)
    assert calls[1] == ("log", {"loss": 2.0}, 5)
    assert calls[2] == ("log", {"samples": ("table", ["text", "r"], [["t", 1]])}, 5)
    assert calls[3] == ("finish",)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.0


def test_missing_wandb_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install rlhf-kit\[wandb\]"):
        MetricsLogger(tmp_path, report_to="wandb")
    with pytest.raises(ValueError, match="unknown report_to"):
        MetricsLogger(tmp_path, report_to="mlflow")


def test_step_timer():
    timer = StepTimer()
    with timer("generate"):
        time.sleep(0.02)
    with timer("generate"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError):
        with timer("train"):
            raise RuntimeError("boom")
    s = timer.summary()
    assert set(s) == {"time/generate", "time/train"} and s["time/generate"] >= 0.03
    timer.reset()
    assert timer.summary() == {}


def test_progress_on_rank_zero():
    bar = progress(range(4), desc="x")
    assert not bar.disable
    assert list(bar) == [0, 1, 2, 3]
