"""docs/notebooks/quickstart.ipynb runs end to end in a real Jupyter kernel: pretrain, the loss plot
shown inline, resume, generate, export, and transformers loading the export."""

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOK = REPO / "docs" / "notebooks" / "quickstart.ipynb"


def _text(outputs) -> str:
    return "".join(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")) for out in outputs)


def test_quickstart_notebook_runs_in_a_kernel_and_each_step_shows_its_result(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Any error cell raises CellExecutionError with the cell's traceback.
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    train, plot, resume, generate, export = code

    assert "step 30/30 | loss" in _text(train.outputs)
    assert any("image/png" in out.get("data", {}) for out in plot.outputs)
    assert "resumed from" in _text(resume.outputs) and "step 50/50 | loss" in _text(resume.outputs)
    assert _text(generate.outputs).count("'def main(' -> ") == 1, _text(generate.outputs)
    assert "\nFalconH1ForCausalLM\ndef main(" in _text(export.outputs), _text(export.outputs)
    assert (tmp_path / "runs" / "quickstart" / "hf" / "config.json").is_file()
    for cell in code:  # a successful run prints no warnings
        assert "warn" not in _text(cell.outputs).lower(), _text(cell.outputs)
