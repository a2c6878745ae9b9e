import json
import sys
import time
import types

import pytest
import torch
import yaml

from rlhf_kit.errors import ConfigError
from rlhf_kit.training import dist as D
from rlhf_kit.training.metrics import (
    Averager,
    MetricsLogger,
    StepTimer,
    check_report_to,
    compile_stats,
    progress,
    read_metrics,
    scalars_to_floats,
    seconds_since_launch,
    tracker_names,
)


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


def test_tensorboard_tracker_writes_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {"lr": 1e-3, "report_to": ("jsonl", "tensorboard"), "actor": None}  # tuples, None: as strings
    logger = MetricsLogger(tmp_path, report_to=["jsonl", "tensorboard"], config=config)
    assert [t.name for t in logger.trackers] == ["tensorboard"]  # accelerate's TensorBoardTracker
    logger.log({"train/loss": torch.tensor(1.5), "lr": 1e-3, "note": "text is not a scalar"}, step=1)
    logger.log({"train/loss": 0.25, "ok": True}, step=2)
    logger.log_table("samples", [["a|b", 2]], ["text", "n"], step=2)
    logger.close()
    logger.close()  # idempotent
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["lr", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.5), (2, 0.25)]
    assert "samples/text_summary" in events.Tags()["tensors"]  # the table as markdown text
    (hparams,) = (tmp_path / "tensorboard").glob("*/hparams.yml")  # store_init_configuration
    stored = yaml.safe_load(hparams.read_text())
    assert stored == {"lr": 1e-3, "report_to": "('jsonl', 'tensorboard')", "actor": "None"}
    rows = read_metrics(tmp_path)  # the jsonl sink is unchanged: every value, tables too
    assert rows[0] == {"step": 1, "train/loss": 1.5, "lr": 1e-3, "note": "text is not a scalar"}
    assert rows[2]["table"] == "samples" and rows[2]["rows"] == [["a|b", 2]]


def test_wandb_through_accelerates_tracker(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    fake.config = types.SimpleNamespace(
        update=lambda values, allow_val_change: calls.append(("config", values))
    )
    fake.Table = lambda columns, data, dataframe: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, report_to=["wandb"], project="p", run_name="r", config={"a": 1})
    logger.log({"loss": 2.0, "s": "x"}, step=5)
    logger.log_table("samples", [["t", 1]], ["text", "r"], step=5)
    logger.close()
    assert calls[0] == ("init", {"project": "p", "name": "r", "dir": str(tmp_path)})
    assert calls[1] == ("config", {"a": 1})
    assert calls[2] == ("log", {"loss": 2.0}, 5)
    assert calls[3] == ("log", {"samples": ("table", ["text", "r"], [["t", 1]])}, 5)
    assert calls[4] == ("finish",)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.0


def test_unknown_tracker_or_missing_package_is_one_line_with_a_hint(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"^--report-to nosuch: unknown tracker; choose from jsonl, aim, .*wandb"
    ):
        MetricsLogger(tmp_path, report_to=["jsonl", "nosuch"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(
        ConfigError,
        match=r"^--report-to wandb: the wandb package is not installed \(pip install 'rlhf-kit\[wandb\]'\)$",
    ):
        check_report_to(("jsonl", "wandb"))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"\(pip install mlflow\)$"):
        check_report_to("mlflow")
    assert check_report_to(("jsonl", "none", "tensorboard", "tensorboard")) == ["tensorboard"]
    assert {"wandb", "tensorboard", "trackio", "mlflow"} <= set(tracker_names())
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the check


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


def test_scalars_to_floats_reads_the_device_once(host_reads):
    """Scalar tensors of any dtype and shape () or (1,) become floats through one stacked copy (each
    ``.item()`` would wait for the device on its own); plain numbers pass through; the order is kept."""
    stats = {
        "a": torch.tensor(1.5),
        "b": 2,
        "c": torch.tensor([3], dtype=torch.long),
        "d": torch.tensor(0.25),
    }
    host_reads.clear()
    out = scalars_to_floats(stats)
    assert host_reads.ours() == ["tolist"]
    assert out == {"a": 1.5, "b": 2.0, "c": 3.0, "d": 0.25} and list(out) == ["a", "b", "c", "d"]
    host_reads.clear()
    assert scalars_to_floats({"x": 1}) == {"x": 1.0} and not host_reads


def test_compile_stats_count_compilations_and_recompilations():
    """Nothing before the first compilation (a fresh process); then one frame and graph per compilation,
    a new input shape counted again, and the seconds grow. In-process counts are deltas: other tests
    compile too."""
    import subprocess

    code = "from rlhf_kit.training.metrics import compile_stats; import torch; print(compile_stats())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{}"
    f = torch.compile(lambda x: x.cos() + 1, backend="eager", fullgraph=True)  # fullgraph counts too
    f(torch.randn(3))
    first = compile_stats()
    assert set(first) == {"compile/frames", "compile/graphs", "compile/seconds", "compile/limit_hits"}
    assert first["compile/seconds"] > 0
    f(torch.randn(3))  # same shape: no new compilation
    assert compile_stats() == first
    f(torch.randn(5))  # a new shape: compiled again
    after = compile_stats()
    assert after["compile/frames"] == first["compile/frames"] + 1
    assert after["compile/graphs"] == first["compile/graphs"] + 1
    assert after["compile/seconds"] > first["compile/seconds"]


def test_compile_stats_count_the_code_objects_that_hit_the_recompile_limit():
    """A function recompiled past Dynamo's limit counts once (its later misses run eagerly, uncounted);
    a function within the limit adds nothing."""
    import torch._dynamo

    from rlhf_kit.models.compile import recompile_limit_setting

    # config.patch, not monkeypatch: pytest's undo deletes a torch config entry instead of restoring it
    # (without automatic dynamic shapes each new length is a new entry)
    with torch._dynamo.config.patch({recompile_limit_setting(): 2, "automatic_dynamic_shapes": False}):
        within = torch.compile(lambda x: x.tan() * 2, backend="eager")
        for n in (2, 3):
            within(torch.ones(n))
        before = compile_stats()["compile/limit_hits"]
        within(torch.ones(2))
        assert compile_stats()["compile/limit_hits"] == before
        over = torch.compile(lambda x: x.sinh() - 1, backend="eager")
        for n in range(2, 7):  # 2 entries, then the limit; 4, 5 and 6 run eagerly
            torch.testing.assert_close(over(torch.ones(n)), torch.ones(n).sinh() - 1)
        assert compile_stats()["compile/limit_hits"] == before + 1


@pytest.mark.parametrize(
    "reason, hit",
    [
        ("cache_size_limit reached", True),  # older releases: f"{limit_type} reached"
        ("accumulated_cache_size_limit reached", True),
        ("recompile_limit reached", True),
        ("Dynamo recompile limit exceeded\n  Explanation: ...", True),
        ("Unsupported Tensor.item() call with capture_scalar_outputs=False", False),
        ("data dependent operator", False),
    ],
)
def test_limit_hits_match_old_and_new_wordings(reason, hit):
    from rlhf_kit.training.metrics import _limit_hit

    assert _limit_hit(reason) is hit


def test_seconds_since_launch_counts_from_process_start(tmp_path):
    """The clock starts when the process does, not when the function is first called: a fresh process
    that sleeps before asking reports at least that sleep."""
    import subprocess

    code = "import time; time.sleep(0.6); from rlhf_kit.training.metrics import seconds_since_launch as s; print(s())"
    got = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert 0.6 <= got < 60
    assert seconds_since_launch() > 0


def test_progress_on_rank_zero():
    bar = progress(range(4), desc="x")
    assert not bar.disable
    assert list(bar) == [0, 1, 2, 3]


def test_averager_keeps_tensor_values_on_their_device_and_reads_once(host_reads):
    """Weighted means of floats and tensors alike; a tensor is not read when added (on a GPU that read
    would wait for the micro-batch's backward), and reduce reads all the tensor sums in one copy."""
    avg = Averager()
    host_reads.clear()
    for loss, acc, n in [
        (torch.tensor(0.5), torch.tensor([0.25]), 2),
        (torch.tensor(1.0), torch.tensor(1.0), 6),
    ]:
        avg.add("loss", loss, n)
        avg.add("accuracy", acc, n)
        avg.add("lr", 1e-3)
    assert host_reads == []
    out = avg.reduce()
    assert [name for name, _ in host_reads] == ["tolist"]
    assert out == pytest.approx({"loss": (0.5 * 2 + 6) / 8, "accuracy": (0.25 * 2 + 6) / 8, "lr": 1e-3})
    assert avg.reduce() == {}  # reset
