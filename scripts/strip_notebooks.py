#!/usr/bin/env python3
"""Strip outputs, execution counts and run metadata from notebooks, in place (atomic writes).

Usage: python scripts/strip_notebooks.py [NOTEBOOK ...]   (default: notebooks/*.ipynb)
Exit status 1 with --check when a notebook would change (nothing is written then).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat

RUN_METADATA = ("execution", "papermill", "ExecuteTime", "collapsed", "scrolled")


def strip(nb) -> bool:
    """Remove outputs and run metadata from ``nb`` in place; True if anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.get("outputs") or cell.get("execution_count") is not None:
                cell.outputs, cell.execution_count, changed = [], None, True
        for key in RUN_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("widgets", "papermill"):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"] or sorted(Path("notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if not strip(nb):
            continue
        dirty.append(path)
        if check:
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            nbformat.write(nb, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for path in dirty:
        print(("has outputs: " if check else "stripped: ") + str(path))
    return 1 if (check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
