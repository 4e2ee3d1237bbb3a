"""Tiny helper to write notebooks from Python lists of cells: nbmake.write(path, [("md", text), ("code", src), ...]).

A code cell whose source starts with "# parameters" gets papermill's `parameters` tag; "# nbval-ignore"
marks a cell whose output nbval should not compare (random or timing output).
"""
import sys
from pathlib import Path

import nbformat


def write(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src))
            continue
        cell = nbformat.v4.new_code_cell(src)
        tags = []
        if src.startswith("# parameters"):
            tags.append("parameters")
        if "# nbval-ignore" in src:
            tags.append("nbval-ignore-output")
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    print(f"wrote {path}", file=sys.stderr)
