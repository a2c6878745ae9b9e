"""One-line errors: printed once per job (by the main process), exit status 2 on every process."""

from __future__ import annotations

import pytest

from rlhf_kit.training import run


@pytest.mark.parametrize("error", [ValueError, FileNotFoundError, ConnectionError])
def test_main_process_prints_the_first_line_only(error, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as info, run.one_line_errors("x.py"):
        raise error("--flag is bad\nsecond line")
    assert info.value.code == 2
    assert capsys.readouterr().err == "x.py: error: --flag is bad\n"


def test_other_ranks_exit_2_silently_after_the_grace(monkeypatch, capsys):
    slept = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(run.time, "sleep", slept.append)
    with pytest.raises(SystemExit) as info, run.one_line_errors("x.py"):
        raise ValueError("--flag is bad")
    assert info.value.code == 2 and capsys.readouterr().err == "" and slept == [run.ERROR_GRACE_S]


def test_other_exceptions_pass_through(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(KeyError), run.one_line_errors("x.py"):
        raise KeyError("not a configuration error")
