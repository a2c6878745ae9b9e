"""Fixtures of the data tests: helpers to write JSONL (the processed HH sample is in tests/conftest.py)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def write_lines(tmp_path):
    """Write raw lines (strings, or dicts dumped as JSON) to a file under tmp_path; returns its path."""

    def write(lines, name="data.jsonl"):
        path = tmp_path / name
        text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write
