"""Every chapter states its run time near the top, and the number is the one measured.

``tools/run_notebooks.py`` (``make notebooks``) records each notebook's execution time in whole seconds in
``notebooks/run_times.json`` and rewrites the chapter's ``Run time: N s ...`` line. These tests check that every
notebook has that line in its first markdown cell, that it states the recorded time, that the recorded times fit
the 150 s budget, and that the tool really does record and rewrite them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import run_notebooks  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMES_FILE = ROOT / "notebooks" / run_notebooks.RUN_TIMES


def recorded() -> dict:
    return json.loads(TIMES_FILE.read_text(encoding="utf-8"))


def stated_seconds(path: Path) -> list[int]:
    nb = nbformat.read(path, as_version=4)
    first_md = next(c for c in nb.cells if c.cell_type == "markdown")
    found = [int(m.group(1)) for m in run_notebooks.RUN_TIME_LINE.finditer(first_md.source)]
    elsewhere = [c for c in nb.cells[1:] if c.cell_type == "markdown" and run_notebooks.RUN_TIME_LINE.search(c.source)
                 and c is not first_md]
    assert not elsewhere, f"{path.name}: a run-time line outside the first markdown cell"
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_chapter_states_its_recorded_run_time(path):
    times = recorded()
    assert path.name in times, f"{path.name} has no measured run time in {TIMES_FILE.name}: run tools/run_notebooks.py"
    found = stated_seconds(path)
    assert len(found) == 1, f"{path.name}: expected one 'Run time: N s' line in the first markdown cell, found {found}"
    assert found[0] == times[path.name], (
        f"{path.name} says {found[0]} s but {TIMES_FILE.name} records {times[path.name]} s")
    assert 0 < times[path.name] <= run_notebooks.BUDGET_SECONDS


def test_no_run_time_for_a_missing_notebook():
    stale = sorted(set(recorded()) - {p.name for p in NOTEBOOKS})
    assert not stale, f"{TIMES_FILE.name} lists notebooks that do not exist: {stale}"


def test_set_run_time_rewrites_only_the_line():
    nb = new_notebook(cells=[new_markdown_cell("# T\n\nGoals.\n\nRun time: 999 s on 2 CPU cores, old text.\n\nMore.")])
    assert run_notebooks.set_run_time(nb, 12)
    assert nb.cells[0].source == "# T\n\nGoals.\n\n" + run_notebooks.run_time_line(12) + "\n\nMore."
    assert run_notebooks.RUN_TIME_LINE.search(run_notebooks.run_time_line(12)).group(1) == "12"
    assert not run_notebooks.set_run_time(new_notebook(cells=[new_markdown_cell("# No line")]), 5)


def test_run_notebooks_records_and_states_the_time(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    (tmp_path / run_notebooks.RUN_TIMES).write_text(json.dumps({"other.ipynb": 42}), encoding="utf-8")
    path = tmp_path / "ch.ipynb"
    nbformat.write(new_notebook(cells=[new_markdown_cell("# Ch\n\nRun time: 999 s on 2 CPU cores."),
                                       new_code_cell("import time\ntime.sleep(1.2)")],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}}), path)
    assert run_notebooks.main([str(path)]) == 0
    times = json.loads((tmp_path / run_notebooks.RUN_TIMES).read_text(encoding="utf-8"))
    assert times["other.ipynb"] == 42 and 1 <= times["ch.ipynb"] < 60
    assert stated_seconds(path) == [times["ch.ipynb"]]
