"""Every notebook runs top to bottom (with MINIGPT_NOTEBOOK_FAST=1: the tiny corpus and tiny settings)."""
import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-dev.txt")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "*.ipynb")))


def test_there_are_eight_notebooks():
    assert len(NOTEBOOKS) == 8


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIGPT_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' throwaway run folders land where pytest cleans up
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError, naming the cell, when any cell fails
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
