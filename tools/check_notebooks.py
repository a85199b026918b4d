"""Hygiene check of the executed notebooks that the book shows and nbval validates.

A notebook passes when:

* no stored output is an error (``output_type == "error"``) or contains a
  Python traceback (in a stream, or in any text of a rich output);
* its non-empty code cells were executed once each, top to bottom, in one
  kernel: their ``execution_count`` values are exactly 1, 2, 3, ... with none
  missing (empty code cells are ignored);
* no volatile metadata is left: no per-cell execution timestamps
  (``metadata.execution``, as nbclient and JupyterLab record them,
  ``metadata.ExecuteTime`` of the classic extension, ``metadata.papermill``).
  ``collapsed``, ``scrolled``, ``tags`` and the notebook's ``widgets`` state
  are fine.

``tools/run_notebooks.py`` (``make notebooks``) writes notebooks that pass.

Usage::

    python tools/check_notebooks.py [NOTEBOOK ...]   # default: notebooks/*.ipynb

Exit status 0 when every notebook passes, 1 otherwise (each problem printed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

#: Cell metadata keys that record when or how long a cell ran.
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "papermill")
#: Notebook metadata keys that record when or how long a run took.
VOLATILE_NOTEBOOK_METADATA = ("papermill",)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def _texts(output) -> list[str]:
    """Every piece of text an output stores (stream text, text/* data, a traceback)."""
    texts = []
    if "text" in output:
        texts.append(output["text"])
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            texts.append(value if isinstance(value, str) else str(value))
    if "traceback" in output:
        texts.extend(output["traceback"])
    return ["".join(t) if isinstance(t, list) else str(t) for t in texts]


def check_nb(nb, name: str = "notebook") -> list[str]:
    """Problems of an in-memory notebook (``nbformat.NotebookNode``), as readable strings."""
    problems: list[str] = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as e:
        problems.append(f"{name}: not a valid nbformat {nb.get('nbformat')} notebook: {e.message}")

    for key in VOLATILE_NOTEBOOK_METADATA:
        if key in nb.get("metadata", {}):
            problems.append(f"{name}: volatile notebook metadata {key!r} (run tools/run_notebooks.py)")

    expected = 1
    for index, cell in enumerate(nb.get("cells", [])):
        where = f"{name}: cell {index}"
        for key in VOLATILE_CELL_METADATA:
            if key in cell.get("metadata", {}):
                problems.append(f"{where}: volatile cell metadata {key!r} (run tools/run_notebooks.py)")
        if cell.get("cell_type") != "code":
            continue

        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(
                    f"{where}: stored error output {output.get('ename', '?')}: {output.get('evalue', '')}".rstrip()
                )
            elif any(_TRACEBACK.search(_ANSI.sub("", t)) for t in _texts(output)):
                problems.append(f"{where}: stored output contains a traceback")

        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        count = cell.get("execution_count")
        if not source.strip():
            continue
        if count is None:
            problems.append(f"{where}: code cell was not executed (execution_count is null; expected {expected})")
        elif count != expected:
            problems.append(
                f"{where}: execution_count is {count}, expected {expected} "
                "(cells must run once each, top to bottom, in one kernel)"
            )
        expected += 1
    return problems


def check_notebook(path: str | Path) -> list[str]:
    """Problems of the notebook file at ``path``, as readable strings (empty when it is clean)."""
    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # unreadable JSON, wrong format: report, do not crash the check
        return [f"{path}: cannot be read as a notebook: {e}"]
    return check_nb(nb, name=str(path))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        paths = [Path(a) for a in args]
    else:
        paths = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
    if not paths:
        print("check_notebooks: no notebooks given or found", file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        problems = check_notebook(path)
        if problems:
            failed += 1
            for problem in problems:
                print(problem)
        else:
            print(f"{path}: ok")
    if failed:
        print(f"check_notebooks: {failed} of {len(paths)} notebook(s) have problems", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
