"""Every notebook in examples/ runs top to bottom as a notebook (nbclient, a real ipykernel), with no
cell error, and ends with a plot. Notebooks are stored without outputs."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a whole notebook takes 20-50 s on 2 idle CPU cores


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"ppo_from_pieces.ipynb", "reward_model_from_pieces.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


def image_outputs(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.output_type == "display_data" and "image/png" in o.data]


def execute(nb, monkeypatch, tmp_path) -> float:
    """Run ``nb`` in place in a fresh python3 kernel from the repository root; returns the wall time.
    Raises ``CellExecutionError`` (naming the cell) on any cell error, assertions included."""
    # the kernel inherits the environment: plots must go to the inline backend, not a file backend
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # connection files and IPython's profile go to the test's directory, not the user's home
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(ROOT)}},
    )  # fmt: skip
    started = time.perf_counter()
    client.execute()
    return time.perf_counter() - started


def test_the_harness_catches_errors_and_missing_plots(monkeypatch, tmp_path):
    v4 = nbformat.v4
    plot = "import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.show()"
    cells = [
        v4.new_code_cell(plot),
        v4.new_code_cell("print('no plot')"),
        v4.new_code_cell("assert 1 == 2, 'x'"),
    ]
    nb = v4.new_notebook(cells=cells)
    with pytest.raises(CellExecutionError, match="AssertionError"):
        execute(nb, monkeypatch, tmp_path)
    # the cells before the failing one ran: a plot is told from a print
    assert image_outputs(nb.cells[0]) and not image_outputs(nb.cells[1])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
    nb = nbformat.read(path, as_version=4)
    print(f"{path.name}: {execute(nb, monkeypatch, tmp_path):.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    assert image_outputs(code[-1]), f"{path.name}: the last code cell shows no image/png plot"
