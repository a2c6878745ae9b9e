"""Checkpoint paths of the critic server: only 'final' and 'checkpoints/<name>', real paths, no deletion of
anything the server did not write (issue 16: /save "." deleted the whole output directory)."""

from __future__ import annotations

import json
import os

import pytest

from rlhf_kit.serving.store import MARKER, CheckpointStore


def writer(train_calls: int):
    def write(tmp):
        (tmp / "weights.bin").write_text(str(train_calls))
        (tmp / MARKER).write_text(json.dumps({"train_calls": train_calls}))

    return write


@pytest.fixture
def out(tmp_path):
    """An output directory as the recipe leaves it: the served reward model under init/, a log file."""
    out = tmp_path / "out"
    (out / "init").mkdir(parents=True)
    (out / "init" / "model.safetensors").write_text("rm")
    (out / "server.log").write_text("log")
    return out


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "path",
    [".", "", "init", "checkpoints", "server.log", "checkpoints/..", "checkpoints/../init", "../out",
     "checkpoints/.hidden", "checkpoints/a/b", "final/x", "/tmp/elsewhere", "./final", "checkpoints//x"],
)  # fmt: skip
def test_only_server_named_paths_are_accepted_and_nothing_is_deleted(out, path):
    store = CheckpointStore(out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="saves only to 'final' or 'checkpoints/<name>'"):
        store.save(path, writer(1))
    with pytest.raises(ValueError, match="saves only to"):
        store.load_dir(path)
    assert snapshot(out) == before


def test_save_replaces_only_its_own_directories(out):
    store = CheckpointStore(out)
    assert store.save("final", writer(1)) == out / "final"
    assert store.save("final", writer(2)) == out / "final"  # its own: replaced atomically
    assert (out / "final" / "weights.bin").read_text() == "2"
    (out / "checkpoints" / "step_1").mkdir(parents=True)  # someone else's directory at a server name
    (out / "checkpoints" / "step_1" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and was not written by a critic server"):
        store.save("checkpoints/step_1", writer(3))
    assert (out / "checkpoints" / "step_1" / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]  # no temporary left


def test_keep_last_prunes_only_server_checkpoints_under_checkpoints(out):
    store = CheckpointStore(out)
    store.save("final", writer(9))
    (out / "checkpoints" / "other").mkdir(parents=True)  # not the server's
    for step in (1, 2, 3):
        store.save(f"checkpoints/step_{step}", writer(step), keep_last=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["other", "step_3"]
    assert (out / "final" / MARKER).is_file() and (out / "init" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="keep_last applies to 'checkpoints/<name>' saves"):
        store.save("final", writer(10), keep_last=1)
    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="keep_last must be a positive integer"):
            store.save("checkpoints/step_4", writer(4), keep_last=bad)


def test_symlinks_never_lead_outside(out, tmp_path):
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "data.txt").write_text("precious")
    store = CheckpointStore(out)
    os.symlink(outside, out / "checkpoints")  # the whole checkpoints dir points elsewhere
    with pytest.raises(ValueError, match="is a symlink"):
        store.save("checkpoints/victim", writer(1))
    os.remove(out / "checkpoints")
    (out / "checkpoints").mkdir()
    os.symlink(outside / "victim", out / "checkpoints" / "step_1")  # one checkpoint points elsewhere
    with pytest.raises(ValueError, match="is a symlink"):
        store.save("checkpoints/step_1", writer(1))
    with pytest.raises(ValueError, match="is a symlink"):
        store.load_dir("checkpoints/step_1")
    os.symlink(outside / "victim", out / "checkpoints" / ".step_2.tmp")  # a planted temporary
    os.symlink(outside / "victim", out / "checkpoints" / "step_0")  # a planted sibling for keep_last
    (outside / "victim" / MARKER).write_text(json.dumps({"train_calls": 0}))
    store.save("checkpoints/step_2", writer(2), keep_last=1)
    assert (out / "checkpoints" / "step_2" / "weights.bin").read_text() == "2"
    assert not (out / "checkpoints" / ".step_2.tmp").exists()  # the link was removed, not followed
    assert sorted(p.name for p in (outside / "victim").iterdir()) == [MARKER, "data.txt"]
    assert (outside / "victim" / "data.txt").read_text() == "precious"


def test_an_operator_symlinked_output_dir_is_followed_once(out, tmp_path):
    link = tmp_path / "link"
    os.symlink(out, link)
    store = CheckpointStore(link)
    assert store.save("final", writer(1)) == out / "final"
    assert store.load_dir("final") == out / "final"
    with pytest.raises(ValueError, match=f"no critic server checkpoint at {out / 'checkpoints' / 'nope'}"):
        store.load_dir("checkpoints/nope")
