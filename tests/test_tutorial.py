"""docs/tutorial.ipynb runs top to bottom, in a kernel of this interpreter, without an error."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tutorial", DOCS / "build_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_notebook_is_the_built_one():
    committed = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    built = load_builder().build()
    assert [c.source for c in committed.cells] == [c.source for c in built.cells]
    assert [c.cell_type for c in committed.cells] == [c.cell_type for c in built.cells]
    # rendered with its pictures: an HTML page beside it, figures inline in both
    html = (DOCS / "tutorial.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64") >= 10
    images = sum("image/png" in out.get("data", {}) for c in committed.cells
                 if c.cell_type == "code" for out in c.outputs)
    assert images >= 10


@pytest.mark.slow
def test_the_notebook_executes_without_errors(tmp_path, monkeypatch):
    # A kernel spec of this very interpreter, so the notebook sees this vaekit and its torch.
    spec = tmp_path / "kernels" / "vaekit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vaekit test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notebook = load_builder().build()
    client = NotebookClient(notebook, timeout=900, kernel_name="vaekit-test",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    outputs = [out for c in notebook.cells if c.cell_type == "code" for out in c.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 10
    text = "".join(out.get("text", "") for out in outputs)
    assert "identical samples after the round trip: True" in text
