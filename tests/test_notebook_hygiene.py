"""Notebook hygiene: every stored notebook is clean, and the checker can fail.

The first test runs ``tools/check_notebooks.py`` on every ``notebooks/*.ipynb``
(no stored errors or tracebacks, cells executed 1..n in order, no volatile
metadata). The others build small notebooks with nbformat, one per defect, and
prove that the checker reports each one, and that ``tools/run_notebooks.py``
writes notebooks that pass it. The last ones check what the book hides: every cell
that only asserts carries the ``remove-cell`` tag, and no tag hides a printed
output or a figure.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from check_notebooks import check_notebook  # noqa: E402
from check_notebooks import main as check_main  # noqa: E402
import run_notebooks  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_notebook_is_clean(path):
    problems = check_notebook(path)
    assert not problems, "\n".join(problems) + "\n(regenerate with `make notebooks`)"


# ----------------------------------------------------------------------------- synthetic notebooks


def stdout(text):
    return new_output("stream", name="stdout", text=text)


def code(source, count, outputs=(), **metadata):
    return new_code_cell(source, execution_count=count, outputs=list(outputs), metadata=metadata)


def clean_cells():
    """A small notebook that must pass: markdown, tagged and collapsed cells, an empty code cell, a result."""
    return [
        new_markdown_cell("# A chapter"),
        code("import math", 1),
        code("print(round(math.pi, 4))", 2, [stdout("3.1416\n")], collapsed=True, scrolled=False),
        new_code_cell(""),  # empty code cell: never executed, not counted
        code("# NBVAL_IGNORE_OUTPUT\n2 + 2", 3,
             [new_output("execute_result", data={"text/plain": "4"}, execution_count=3)], tags=["keep"]),
        code("print('a message that mentions a ValueError is fine')", 4,
             [stdout("a message that mentions a ValueError is fine\n")]),
    ]


def write(tmp_path, cells, name="nb.ipynb", **metadata):
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}, **metadata})
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_clean_notebook_passes(tmp_path):
    path = write(tmp_path, clean_cells(), widgets={"application/vnd.jupyter.widget-state+json": {
        "state": {}, "version_major": 2, "version_minor": 0}})
    assert check_notebook(path) == []
    assert check_main([str(path)]) == 0


def test_error_output_is_caught(tmp_path):
    cells = clean_cells()
    cells[2].outputs.append(new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                       traceback=["ZeroDivisionError: division by zero"]))
    problems = check_notebook(write(tmp_path, cells))
    assert any("error output ZeroDivisionError" in p for p in problems), problems


@pytest.mark.parametrize("where", ["stderr", "stdout", "text/plain"])
def test_traceback_in_an_output_is_caught(tmp_path, where):
    traceback = ('Traceback (most recent call last):\n  File "<stdin>", line 1, in <module>\n'
                 "ValueError: bits=9 out of range 2..8\n")
    if where == "text/plain":
        output = new_output("display_data", data={"text/plain": traceback})
    else:
        output = new_output("stream", name=where, text=traceback)
    cells = clean_cells()
    cells[1].outputs.append(output)
    problems = check_notebook(write(tmp_path, cells))
    assert any("cell 1" in p and "traceback" in p for p in problems), problems


def test_ansi_coloured_traceback_is_caught(tmp_path):
    cells = clean_cells()
    cells[1].outputs.append(new_output("stream", name="stderr",
                                       text="\x1b[0;31mTraceback \x1b[0m(most recent call last)\nKeyError: 'x'\n"))
    problems = check_notebook(write(tmp_path, cells))
    assert any("traceback" in p for p in problems), problems


def test_out_of_order_execution_is_caught(tmp_path):
    cells = clean_cells()
    cells[1].execution_count, cells[2].execution_count = 2, 1
    problems = check_notebook(write(tmp_path, cells))
    assert any("cell 1: execution_count is 2, expected 1" in p for p in problems), problems


def test_missing_execution_count_is_caught(tmp_path):
    cells = clean_cells()
    cells[4].execution_count = 4  # 1, 2, 4: count 3 missing (a cell was deleted or run twice)
    cells[5].execution_count = 5
    problems = check_notebook(write(tmp_path, cells))
    assert any("cell 4: execution_count is 4, expected 3" in p for p in problems), problems


def test_counts_not_starting_at_one_are_caught(tmp_path):
    cells = clean_cells()
    for cell, count in zip([c for c in cells if c.cell_type == "code" and c.source], [7, 8, 9, 10]):
        cell.execution_count = count
    problems = check_notebook(write(tmp_path, cells))
    assert any("execution_count is 7, expected 1" in p for p in problems), problems


def test_unexecuted_code_cell_is_caught(tmp_path):
    cells = clean_cells()
    cells.append(new_code_cell("print('never run')"))
    problems = check_notebook(write(tmp_path, cells))
    assert any("not executed" in p for p in problems), problems


@pytest.mark.parametrize("key", ["execution", "ExecuteTime"])
def test_execution_timestamps_are_caught(tmp_path, key):
    cells = clean_cells()
    cells[2].metadata[key] = {"iopub.execute_input": "2026-01-01T00:00:00.000000Z",
                              "shell.execute_reply": "2026-01-01T00:00:01.000000Z"}
    problems = check_notebook(write(tmp_path, cells))
    assert any("cell 2" in p and f"volatile cell metadata {key!r}" in p for p in problems), problems


def test_unreadable_notebook_is_reported(tmp_path):
    path = tmp_path / "broken.ipynb"
    path.write_text("{ not json", encoding="utf-8")
    problems = check_notebook(path)
    assert len(problems) == 1 and "cannot be read" in problems[0]
    assert check_main([str(path)]) == 1


# ----------------------------------------------------------------------------- run_notebooks.py


def test_clean_notebook_fixes_metadata_and_counts(tmp_path):
    cells = clean_cells()
    cells[1].execution_count, cells[2].execution_count = 5, 9
    cells[2].metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    cells[3].execution_count = 4
    path = write(tmp_path, cells)
    assert check_notebook(path)
    nb = nbformat.read(path, as_version=4)
    run_notebooks.clean_notebook(nb)
    nbformat.write(nb, path)
    assert check_notebook(path) == []
    assert nb.cells[2].metadata == {"collapsed": True, "scrolled": False}
    assert nb.cells[3].execution_count is None


def test_run_notebooks_executes_in_place(tmp_path, monkeypatch):
    """One real kernel: cwd is the notebook's folder, PYTHONHASHSEED=0, counts 1..n, written clean."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)  # restored after the test
    folder = tmp_path / "chapters"
    folder.mkdir()
    (folder / "data.txt").write_text("here\n", encoding="utf-8")
    path = write(folder, [
        new_markdown_cell("# Run me"),
        new_code_cell("import os, sys\nprint(open('data.txt').read().strip())"),
        new_code_cell(""),
        new_code_cell("print(os.environ.get('PYTHONHASHSEED'))"),
        new_code_cell("sys.executable == %r" % sys.executable),
    ])
    assert run_notebooks.main([str(path)]) == 0
    nb = nbformat.read(path, as_version=4)
    assert check_notebook(path) == []
    assert [c.execution_count for c in nb.cells if c.cell_type == "code"] == [1, None, 2, 3]
    assert nb.cells[1].outputs[0].text == "here\n"
    assert nb.cells[3].outputs[0].text == "0\n"
    assert nb.cells[4].outputs[0].data["text/plain"] == "True"


def test_run_notebooks_fails_and_keeps_a_raising_notebook(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    path = write(tmp_path, [new_code_cell("print('before')"), new_code_cell("1 / 0")])
    before = path.read_bytes()
    assert run_notebooks.main([str(path)]) == 1
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


# ----------------------------------------------------------------------------- what the book hides

#: Chapters whose assert cells are not tagged yet (none left).
UNTAGGED: set[str] = set()
#: MyST-NB tags that drop a cell's output from the book (``remove-input`` keeps it and is not listed).
HIDES_OUTPUT = {"remove-cell", "remove_cell", "remove-output", "remove_output"}
#: Statements an assert cell may hold besides its asserts: helper assignments, and loops or ifs around them.
_QUIET = (ast.Assert, ast.Assign, ast.AugAssign, ast.AnnAssign)


def is_assert_cell(source: str) -> bool:
    """True for a code cell that only checks: asserts, comments, helper assignments and loops of them.

    Such a cell prints and draws nothing (no expression statement, so no call to ``print`` or ``plt``), so the
    book can hide it whole with the ``remove-cell`` tag.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False

    def quiet(body):
        return all(isinstance(s, _QUIET) or (isinstance(s, (ast.For, ast.If)) and quiet(s.body) and quiet(s.orelse))
                   for s in body)

    return any(isinstance(n, ast.Assert) for n in ast.walk(tree)) and quiet(tree.body)


def _shows_something(outputs) -> bool:
    """A printed line, a figure or HTML (the player of an animation) among a cell's outputs."""
    for out in outputs:
        if out["output_type"] == "stream" and "".join(out.get("text", "")).strip():
            return True
        if any(m.startswith("image/") or m == "text/html" for m in out.get("data", {})):
            return True
    return False


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in UNTAGGED],
                         ids=[p.name for p in NOTEBOOKS if p.name not in UNTAGGED])
def test_assert_cells_are_hidden_in_the_book(path):
    """Every cell of asserts carries ``remove-cell``: the book reads without test scaffolding (the notebook and
    its download keep the cell, and book/intro.md says so)."""
    nb = nbformat.read(path, as_version=4)
    bare = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and is_assert_cell(c.source)
            and "remove-cell" not in c.metadata.get("tags", [])]
    assert not bare, f"{path.name}: cells {bare} only assert; tag them remove-cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_printed_output_or_figure_is_hidden(path):
    """A tag that drops a cell's output is only on cells whose output a reader does not need: nothing printed, no
    figure, no HTML; and ``remove-cell`` only on cells of asserts."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type != "code" or not tags & HIDES_OUTPUT:
            continue
        assert not _shows_something(cell.outputs), f"{path.name} cell {i}: {sorted(tags)} hides a printed output"
        if tags & {"remove-cell", "remove_cell"}:
            assert is_assert_cell(cell.source), f"{path.name} cell {i}: remove-cell on a cell that is not only asserts"


@pytest.mark.parametrize("source, expected", [
    ("assert x == 1", True),
    ("# a comment\nassert x == 1  # why\n\nassert y", True),
    ("w = f(a)\nassert w > 0", True),
    ("for k, v in d.items():\n    assert v > 0, k\n    if k:\n        assert k", True),
    ("x = 1", False),  # no assert: a computation
    ("assert x\nprint(x)", False),
    ("assert x\nplt.show()", False),
    ("# NBVAL_IGNORE_OUTPUT\nassert x\nx", False),  # shows x
    ("for v in d:\n    print(v)\n    assert v", False),
    ("", False),
    ("assert (", False),
])
def test_is_assert_cell(source, expected):
    assert is_assert_cell(source) is expected
