"""Make executed lessons fit to commit: what a static viewer (GitHub, nbviewer) cannot show is dropped.

    TQDM_DISABLE=1 PULID_LAB_UPDATE_FIGURES=1 papermill notebooks/NB.ipynb notebooks/NB.ipynb --cwd notebooks
    python scripts/clean_lesson_outputs.py notebooks/NB.ipynb

Drops the saved widget state, every output that is a widget view (progress bars, explorers: a static viewer shows
"0%" or "model not found"; each explorer is followed by a static picture of it) and the kernel's start-up
warnings. ``tests/test_notebook_outputs.py`` checks the committed lessons for exactly this.
"""
import sys

import nbformat

NOISE = ("IPKernelApp", "Port 8787 is already in use")  # kernel transport warning; a second Dask dashboard


def clean(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs
                        if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})
                        and not (o.get("name") == "stderr" and any(n in o.get("text", "") for n in NOISE))]
    nbformat.write(nb, path)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/clean_lesson_outputs.py NOTEBOOK.ipynb [...]")
    for p in sys.argv[1:]:
        clean(p)
        print("cleaned", p)
