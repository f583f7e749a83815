"""Turns the keras-io style guides (``guides/*.py``) into Jupyter notebooks.

    python guides/make_notebooks.py

Triple-quoted blocks at the top level become markdown cells; everything else is code.
"""

import glob
import json
import os
import re


def split_cells(source):
    cells, code = [], []
    for block in re.split(r'^("""[\s\S]*?""")\s*$', source, flags=re.M):
        if block.startswith('"""') and block.endswith('"""'):
            if "".join(code).strip():
                cells.append(("code", "".join(code).strip("\n")))
            code = []
            cells.append(("markdown", block[3:-3].strip("\n")))
        else:
            code.append(block)
    if "".join(code).strip():
        cells.append(("code", "".join(code).strip("\n")))
    return cells


def to_notebook(cells):
    def cell(kind, text):
        lines = text.splitlines(keepends=True)
        base = {"cell_type": kind, "metadata": {}, "source": lines}
        if kind == "code":
            base.update(execution_count=None, outputs=[])
        return base

    header, *rest = cells
    # The keras-io header (Title/Author/...) becomes a markdown title cell.
    fields = dict(line.split(": ", 1) for line in header[1].splitlines() if ": " in line)
    title = [("markdown", f"# {fields.get('Title', '')}\n\n**Author:** {fields.get('Author', '')}"
              f"<br>\n**Description:** {fields.get('Description', '')}")]
    return {
        "cells": [cell(k, t) for k, t in title + rest],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                    "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        if os.path.basename(path) == os.path.basename(__file__):
            continue
        with open(path) as f:
            notebook = to_notebook(split_cells(f.read()))
        out = path[:-3] + ".ipynb"
        with open(out, "w") as f:
            json.dump(notebook, f, indent=1)
            f.write("\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
