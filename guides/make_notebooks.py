"""Turns the keras-io style guides (``guides/*.py``) into Jupyter notebooks.

    python guides/make_notebooks.py              # regenerate the cells from the sources
    python guides/make_notebooks.py --execute    # ... and run them, saving their outputs

Triple-quoted blocks at the top level become markdown cells, a ``\"\"\"shell`` block becomes
an install cell (``!pip ...``), everything else is code. The header's Title / Author /
Date created / Last modified / Description fields make the title cell.

Without ``--execute`` a code cell whose source did not change keeps the outputs the
notebook already has, so regenerating after a prose edit does not throw the run away.
``--execute`` needs the ``guides`` extra (nbclient, nbformat, ipykernel).
"""

import argparse
import glob
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# The environment each guide's notebook is executed with; a guide missing here is not
# executed (its notebook keeps no outputs), with the reason.
EXECUTE = {
    # Each runs with the guide's own settings (a guide reads KMS_GUIDE_STEPS if one ever
    # needs fewer steps here; its markdown should then say so).
    "min_snr_weighting": {},
    "distributed_dit": {},
    "official_vit_sampling": {},
}
NOT_EXECUTED = {
    "sd3_min_snr": "needs a KerasHub SD3 preset (many GB) and a long CPU run",
}
SKIP_TAG = "skip-execution"  # nbclient leaves cells with this tag alone


def split_cells(source):
    cells, code = [], []
    for block in re.split(r'^("""[\s\S]*?""")\s*$', source, flags=re.M):
        if block.startswith('"""') and block.endswith('"""'):
            if "".join(code).strip():
                cells.append(("code", "".join(code).strip("\n")))
            code = []
            if block.startswith('"""shell\n'):
                commands = block[len('"""shell\n'):-3].strip("\n").splitlines()
                cells.append(("shell", "\n".join("!" + line for line in commands)))
            else:
                cells.append(("markdown", block[3:-3].strip("\n")))
        else:
            code.append(block)
    if "".join(code).strip():
        cells.append(("code", "".join(code).strip("\n")))
    return cells


def to_notebook(cells):
    def cell(kind, text):
        lines = text.splitlines(keepends=True)
        base = {"cell_type": "code" if kind == "shell" else kind, "metadata": {},
                "source": lines}
        if kind != "markdown":
            base.update(execution_count=None, outputs=[])
        if kind == "shell":
            # Installing is the reader's step; the executed notebooks run in the
            # environment that already has the package.
            base["metadata"] = {"tags": [SKIP_TAG]}
        return base

    header, *rest = cells
    # The keras-io header (Title/Author/Date created/...) becomes a markdown title cell.
    fields = dict(line.split(": ", 1) for line in header[1].splitlines() if ": " in line)
    title = [("markdown", f"# {fields.get('Title', '')}\n\n"
              f"**Author:** {fields.get('Author', '')}<br>\n"
              f"**Date created:** {fields.get('Date created', '')}<br>\n"
              f"**Last modified:** {fields.get('Last modified', '')}<br>\n"
              f"**Description:** {fields.get('Description', '')}")]
    return {
        "cells": [cell(k, t) for k, t in title + rest],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                    "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def cell_sources(notebook):
    """What a notebook says, without what running it produced."""
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]


def keep_outputs(notebook, old):
    """Copies outputs from ``old`` into the code cells whose source is unchanged."""
    if len(old["cells"]) != len(notebook["cells"]):
        return notebook
    for new_cell, old_cell in zip(notebook["cells"], old["cells"]):
        if (new_cell["cell_type"] == "code" and old_cell["cell_type"] == "code"
                and "".join(new_cell["source"]) == "".join(old_cell["source"])):
            new_cell["outputs"] = old_cell.get("outputs", [])
            new_cell["execution_count"] = old_cell.get("execution_count")
    return notebook


def execute(notebook, env, timeout):
    """Runs the notebook in a fresh kernel, in a scratch folder (the guides write files)."""
    import nbclient
    import nbformat

    nb = nbformat.reads(json.dumps(notebook), as_version=4)  # joins the source lines
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    os.environ.setdefault("PYTHONPATH", os.path.dirname(HERE))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": scratch}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    ran = json.loads(nbformat.writes(nb))
    for cell in ran["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = drop_native_log(cell["outputs"])
    # Only the outputs and counts go into the generated cells: nbclient's timing metadata,
    # the kernel's language_info and nbformat's key order would change the file every run.
    return keep_outputs(json.loads(json.dumps(notebook)), ran)


# TensorFlow's C++ start-up lines (no CUDA driver, CPU features), written to stderr before
# its logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot hide them: they say nothing about
# the guide and would differ on every machine.
NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                        r"|[IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\])")


def drop_native_log(outputs):
    kept = []
    for output in outputs:
        if output["output_type"] == "stream" and output["name"] == "stderr":
            lines = "".join(output["text"]).splitlines(keepends=True)
            text = [line for line in lines if not NATIVE_LOG.match(line)]
            if not text:
                continue
            output = {**output, "text": text}
        kept.append(output)
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true",
                        help="run the notebooks listed in EXECUTE and save their outputs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("guides", nargs="*", help="guide names (default: all)")
    args = parser.parse_args(argv)

    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        name = os.path.basename(path)[:-3]
        if name == "make_notebooks" or (args.guides and name not in args.guides):
            continue
        with open(path) as f:
            notebook = to_notebook(split_cells(f.read()))
        out = path[:-3] + ".ipynb"
        if args.execute and name in EXECUTE:
            print(f"executing {name} with {EXECUTE[name] or 'its own settings'}", flush=True)
            notebook = execute(notebook, EXECUTE[name], args.timeout)
        else:
            if args.execute:
                print(f"not executing {name}: {NOT_EXECUTED.get(name, 'not in EXECUTE')}")
            if os.path.exists(out):
                with open(out) as f:
                    notebook = keep_outputs(notebook, json.load(f))
        with open(out, "w") as f:
            json.dump(notebook, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
