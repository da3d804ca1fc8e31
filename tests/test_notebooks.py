"""The walk-through notebooks execute top to bottom (nbclient), so they never rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # `make test-all` (CI); see README, Tests

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def names():
    return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_exist_and_are_stripped():
    assert names()[:2] == ["01_simulate.ipynb", "02_train.ipynb"]
    for name in names():
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), f"{name}: outputs in git"


@pytest.mark.parametrize("name", names())
def test_notebook_executes(name, workdir, monkeypatch):
    monkeypatch.setenv("STEMNET_NOTEBOOK_DIR", str(workdir))
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in book.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{name}: no figure"
