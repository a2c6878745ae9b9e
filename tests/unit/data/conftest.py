"""Fixtures of the data tests: the shipped HH sample processed once, and helpers to write JSONL."""

from __future__ import annotations

import json

import pytest

from rlhf_kit import default_hh_file
from rlhf_kit.data.hh import process_hh_file


@pytest.fixture(scope="session")
def hh_processed():
    """``(comparisons, prompts, counts)`` of the shipped HH sample."""
    return process_hh_file(default_hh_file())


@pytest.fixture
def write_lines(tmp_path):
    """Write raw lines (strings, or dicts dumped as JSON) to a file under tmp_path; returns its path."""

    def write(lines, name="data.jsonl"):
        path = tmp_path / name
        text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write
