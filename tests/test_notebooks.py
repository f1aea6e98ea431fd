"""The teaching notebooks: each jupytext pair (.py percent source, committed .ipynb with outputs) is in sync, and each
notebook runs top to bottom in quick mode (VERA_LAB_QUICK=1), as CI does.

Edit either side (the .py in an editor, the .ipynb in Jupyter), then `jupytext --sync notebooks/0*.py`.
"""
import os
import sys
from pathlib import Path

import jupytext
import pytest
from jupytext.compare import NotebookDifference, compare_notebooks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
FORMATS = "ipynb,py:percent"
CELL_TIMEOUT_S = 900


def _outputs(cell) -> list:
    return cell.get("outputs", []) if cell.cell_type == "code" else []


def test_every_notebook_is_a_pair():
    """Each numbered notebook exists as a percent-format .py and a committed .ipynb, nothing unpaired."""
    ipynbs = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert NAMES, "no notebooks/NN_*.py found"
    assert NAMES == ipynbs, (f"unpaired notebooks: .py without .ipynb {sorted(set(NAMES) - set(ipynbs))}, "
                             f".ipynb without .py {sorted(set(ipynbs) - set(NAMES))}: run `jupytext --sync` on it")


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync(name):
    """The .ipynb holds the cells of the .py (sources, tags, hidden solutions, kernelspec), outputs aside."""
    text = jupytext.read(NOTEBOOKS / f"{name}.py")
    ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    for nb, suffix in ((text, "py"), (ipynb, "ipynb")):
        assert nb.metadata.get("jupytext", {}).get("formats") == FORMATS, f"{name}.{suffix}: not paired as {FORMATS}"
    try:
        compare_notebooks(text, ipynb, fmt="py:percent")
    except NotebookDifference as diff:
        pytest.fail(f"{name}.py and {name}.ipynb differ: run `jupytext --sync notebooks/{name}.py`\n{diff}")


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("VERA_LAB_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # The kernelspec runs "python", which jupyter_client replaces with this interpreter (the venv's).
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # The kernel works in tmp_path (run directories land there): it finds lab_setup.py, and this checkout's
    # vera_core, on its path, as a kernel started in notebooks/ by Jupyter does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS), str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")  # no recorded outputs: everything checked below comes from this run
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    errors = [o for c in nb.cells for o in _outputs(c) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert "QUICK" in "".join(o.get("text", "") for o in _outputs(nb.cells[1])), "setup cell must report quick mode"
    image_cells = [c for c in nb.cells if "expect-image" in c.metadata.get("tags", [])]
    assert image_cells, f"{name}: no cell is tagged expect-image"
    for cell in image_cells:
        assert any("image/png" in o.get("data", {}) for o in _outputs(cell)), (
            f"{name}: a key cell produced no image:\n{cell.source[:200]}")
    solutions = [c for c in nb.cells if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert len(solutions) == 1 and nb.cells[-1] is solutions[0], f"{name}: exercises' solutions must be the last, hidden cell"
    assert "solution" in solutions[0].metadata.get("tags", []), f"{name}: the hidden solution cell must be tagged"
