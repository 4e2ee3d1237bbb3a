"""What a reader sees in the committed lessons without a kernel: no saved widget views (they show "0%" or
"model not found" on a static viewer), no path of the machine a lesson ran on."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_static_and_machine_free(path):
    nb = json.loads(path.read_text())
    assert "widgets" not in nb.get("metadata", {}), "saved widget state: strip it before committing"
    home = str(Path.home())
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert "application/vnd.jupyter.widget-view+json" not in data, f"{path.name} cell {i}: a saved widget view"
            text = "".join(out.get("text", "")) + "".join(data.get("text/plain", ""))
            for machine in ("/work/", "/tmp/", home + "/"):
                assert machine not in text, f"{path.name} cell {i} prints a machine path ({machine}...)"


def test_every_explorer_has_a_static_picture_after_it():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and "_explorer(" in src and "import" not in src.splitlines()[-1]:
                after = "".join("".join(c["source"]) for c in cells[i + 1:i + 3])
                assert "plot_" in after, f"{path.name} cell {i}: an explorer without a static picture after it"
