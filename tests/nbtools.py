"""Helpers for the tests that execute the project's notebooks (notebooks/*.ipynb) or check their committed form."""

from __future__ import annotations

from pathlib import Path

import nbformat


def execute(path: Path, timeout: int = 120) -> nbformat.NotebookNode:
    """Run every cell of the notebook at `path` in a python3 kernel, from its own folder (the notebooks find the
    repo from there); fails on any cell that raised. Environment (its parameters, MPLBACKEND) is the caller's."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
    return nb


def committed_code_cells(path: Path) -> list[nbformat.NotebookNode]:
    """The code cells of the committed notebook at `path`, after checking that none carries outputs or an execution
    count (a notebook is committed cleared, so that a diff shows code, not a run's results)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    return code
