"""The benchmark harness: named cells (method x bits x calibration seed), one subprocess per cell, resumable.

A :class:`Cell` is one ``detptq-mini quantize ... --json`` run. :func:`run_suite` runs a named suite (or any list of
cells) one cell per subprocess, so that each cell's wall time and peak memory (its own ``ru_maxrss``, read with
``os.wait4``) are its own, and after every finished cell rewrites the result file atomically::

    {"suite": "simple", "machine": {...}, "cells": {"lp-p2.5-W4A4-s0-c64-v500": {record}, ...}}

Cells already in the file with ``"status": "ok"`` are skipped, so an interrupted run resumes where it stopped (in the
same session or a later one). A failed cell (nonzero exit) is recorded with the last line of its stderr, is not counted
as done (the next run retries it), and the run goes on with the next cell. A markdown table
(:func:`to_markdown`) is written next to the JSON.

Command line: ``detptq-mini benchmark --suite quick`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .lp import P_DEFAULT
from .utils import atomic_write_json, atomic_write_text

__all__ = ["Cell", "SUITES", "SuiteRun", "cell_args", "run_cell", "run_suite", "select_cells", "load_results",
           "machine_info", "summarize", "to_markdown"]


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: ``detptq-mini quantize`` with these options.

    Attributes:
        method: a ``quantize --method`` (not checked here: an unknown method makes a failed cell).
        w_bits, a_bits: bit widths (not range-checked here: the child reports bad values, the cell fails).
        seed: the calibration seed (the ``seed`` of the calib split).
        p: the fixed p (``--p``), or None.
        calib: number of calibration images.
        val: number of val images for the mAP.
        iters: ``--iters`` for the reconstruction methods, or None (the option is then not passed).
        extra: further ``quantize`` arguments, e.g. ``("--no-8bit-stem",)``.
    """

    method: str
    w_bits: int
    a_bits: int
    seed: int = 0
    p: float | None = None
    calib: int = 64
    val: int = 500
    iters: int | None = None
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method or any(c.isspace() for c in self.method):
            raise ValueError(f"method={self.method!r} must be a non-empty method name without spaces")
        for name in ("w_bits", "a_bits", "seed", "calib", "val"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r} must be an integer")
        if self.iters is not None and (isinstance(self.iters, bool) or not isinstance(self.iters, int)):
            raise ValueError(f"iters={self.iters!r} must be an integer or None")
        if self.p is not None:
            if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not math.isfinite(self.p):
                raise ValueError(f"p={self.p!r} must be a finite number or None")
            object.__setattr__(self, "p", float(self.p))
        extra = tuple(self.extra) if isinstance(self.extra, (list, tuple)) else self.extra
        if not isinstance(extra, tuple) or not all(isinstance(a, str) for a in extra):
            raise ValueError(f"extra={self.extra!r} must be a tuple of strings (command-line arguments)")
        object.__setattr__(self, "extra", extra)

    @property
    def bits(self) -> str:
        """``"W4A4"``."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def key(self) -> str:
        """A stable, readable id, e.g. ``"lp-p2.5-W4A4-s0-c64-v500"`` (``-i<iters>`` and ``+<arg>`` when set)."""
        parts = [self.method]
        if self.p is not None:
            parts.append(f"p{self.p:g}")
        parts += [self.bits, f"s{self.seed}", f"c{self.calib}", f"v{self.val}"]
        if self.iters is not None:
            parts.append(f"i{self.iters}")
        key = "-".join(parts)
        for a in self.extra:
            key += "+" + a.lstrip("-")
        return key


def _simple_suite() -> list[Cell]:
    """Bits, then method (min-max, Lp with p = 1..4.5, DetPTQ), then seed: a table reads top to bottom."""
    variants = [("minmax", None), *(("lp", p) for p in P_DEFAULT), ("detptq", None)]
    return [Cell(method, w, a, seed, p=p) for w, a in ((4, 4), (4, 8)) for method, p in variants for seed in (0, 1, 2)]


#: The named suites. ``simple``: min-max, Lp with every fixed p in ``P_DEFAULT`` and DetPTQ, at W4A4 and W4A8, with
#: calibration seeds 0, 1, 2 (60 cells, about 30 minutes on 2 cores). ``quick``: a two-cell smoke slice (minutes).
SUITES: dict[str, list[Cell]] = {
    "simple": _simple_suite(),
    "quick": [Cell("minmax", 4, 8, 0, calib=8, val=50), Cell("lp", 4, 8, 0, p=2.0, calib=8, val=50)],
}


def cell_args(cell: Cell, device: str = "cpu") -> list[str]:
    """The ``detptq-mini`` arguments of a cell (``quantize ... --json``)."""
    args = ["quantize", "--method", cell.method, "--w-bits", str(cell.w_bits), "--a-bits", str(cell.a_bits),
            "--seed", str(cell.seed), "--calib", str(cell.calib), "--val", str(cell.val)]
    if cell.p is not None:
        args += ["--p", f"{cell.p:g}"]
    if cell.iters is not None:
        args += ["--iters", str(cell.iters)]
    return [*args, *cell.extra, "--device", str(device), "--json"]


def _maxrss_mb(ru_maxrss: int) -> float:
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 2**10  # bytes on macOS, KiB elsewhere


def run_cell(cell: Cell, device: str = "cpu") -> dict:
    """Run one cell in a fresh ``python -m detptq_mini.cli`` process; return its record.

    The record holds ``key``, ``cell`` (the fields), ``status`` (``"ok"`` or ``"failed"``), ``returncode``,
    ``wall_seconds``, ``cpu_seconds`` and ``peak_rss_mb`` (the child's own peak resident memory, from ``os.wait4``),
    then every field of the command's JSON output (``map``, ``map50``, ``fp_map``, ``ratio_to_fp``, ``config``,
    ``chosen_p``, ...) when it succeeded, or ``error`` (the last line of its stderr) when it failed.
    """
    cmd = [sys.executable, "-m", "detptq_mini.cli", *cell_args(cell, device)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            _, status, ru = os.wait4(proc.pid, 0)  # the child's own rusage, unlike RUSAGE_CHILDREN
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    rec = {"key": cell.key, "cell": asdict(cell), "status": "ok", "returncode": rc, "wall_seconds": round(wall, 3),
           "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "peak_rss_mb": round(_maxrss_mb(ru.ru_maxrss), 1)}
    result = None
    if rc == 0:
        try:
            result = json.loads(stdout.strip().splitlines()[-1])
            if not isinstance(result, dict):
                raise ValueError
        except (ValueError, IndexError):
            result, stderr = None, f"exit 0 but no JSON object on stdout: {stdout.strip()[-200:]!r}"
    if result is None:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        rec["status"] = "failed"
        rec["error"] = lines[-1].strip() if lines else f"exit status {rc} with an empty stderr"
    else:
        for k, v in result.items():
            rec.setdefault(k, v)  # the harness's own fields win over a same-named output field
    return rec


def machine_info() -> dict:
    """Where the numbers were measured: platform, CPU count, Python, torch version and threads."""
    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def load_results(path: str | os.PathLike) -> dict | None:
    """The result file at ``path`` (None if missing), checked for the ``{"suite", "machine", "cells"}`` layout."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"out={str(path)!r} is not a JSON file ({e}); move it away or choose another --out") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict) or "suite" not in data:
        raise ValueError(f"out={str(path)!r} is not a benchmark result file (no 'suite' and 'cells')")
    return data


@dataclass
class SuiteRun:
    """What :func:`run_suite` did: the results as written, and which cells ran, were skipped, failed."""

    results: dict
    out_path: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line: cells run, skipped, failed."""
        return (f"benchmark {self.results['suite']}: {len(self.ran)} run, {len(self.skipped)} skipped, "
                f"{len(self.failed)} failed in {self.seconds:.4g} s -> {self.out_path}")


def _is_done(rec) -> bool:
    return isinstance(rec, dict) and rec.get("status") == "ok"


def _suite_cells(name_or_cells) -> tuple[str, list[Cell]]:
    if isinstance(name_or_cells, str):
        if name_or_cells not in SUITES:
            raise ValueError(f"suite={name_or_cells!r} is not a suite; allowed: {', '.join(SUITES)}")
        return name_or_cells, list(SUITES[name_or_cells])
    cells = list(name_or_cells)
    if not cells or not all(isinstance(c, Cell) for c in cells):
        raise ValueError("name_or_cells must be a suite name or a non-empty list of Cell")
    return "custom", cells


def select_cells(name_or_cells, only: str | None = None) -> tuple[str, list[Cell]]:
    """The suite's name and cells, keeping those whose key contains ``only`` (error if none does)."""
    name, cells = _suite_cells(name_or_cells)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the cells' keys are not unique: each cell must differ")
    if only is not None:
        cells = [c for c in cells if only in c.key]
        if not cells:
            raise ValueError(f"only={only!r} matches no cell of suite {name!r} (see `detptq-mini benchmark --list`)")
    return name, cells


def run_suite(name_or_cells, out_path: str | os.PathLike, progress: bool = False, only: str | None = None,
              device: str = "cpu") -> SuiteRun:
    """Run every cell of a suite not already done in ``out_path``, one subprocess each; resumable.

    Args:
        name_or_cells: a key of :data:`SUITES`, or a list of :class:`Cell` (the suite is then called ``"custom"``).
        out_path: the JSON result file (its directory must exist). Loaded if present (it must be of the same suite);
            rewritten atomically after every cell; a markdown table (:func:`to_markdown`) is written next to it.
        progress: show a tqdm progress bar (on stderr).
        only: run only the cells whose key contains this substring.
        device: passed to each cell's ``--device``.

    Returns:
        a :class:`SuiteRun` (``.failed`` non-empty if any cell failed; those cells are retried by the next run).
    """
    t0 = time.perf_counter()
    name, cells = select_cells(name_or_cells, only)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ValueError(f"out_path={str(out_path)!r}: directory {str(out_path.parent)!r} does not exist")
    machine = machine_info()
    data = load_results(out_path)
    if data is None:
        data = {"suite": name, "machine": machine, "cells": {}}
    elif data["suite"] != name:
        raise ValueError(f"out_path={str(out_path)!r} holds suite {data['suite']!r}, not {name!r}; choose another out")
    all_keys = [c.key for c in _suite_cells(name_or_cells)[1]]
    done = [c for c in cells if _is_done(data["cells"].get(c.key))]
    todo = [c for c in cells if not _is_done(data["cells"].get(c.key))]
    run = SuiteRun(results=data, out_path=out_path, skipped=[c.key for c in done])

    from tqdm.auto import tqdm

    bar = tqdm(todo, desc=f"benchmark {name}", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        rec = run_cell(cell, device=device)
        if data.get("machine") != machine:
            rec["machine"] = machine  # resumed on another machine: say so on the cells measured here
        cells_now = dict(data["cells"])
        cells_now[cell.key] = rec
        data = {"suite": name, "machine": data.get("machine", machine), "cells": _ordered(cells_now, all_keys)}
        atomic_write_json(out_path, data)
        run.results = data
        (run.ran if rec["status"] == "ok" else run.failed).append(cell.key)
    bar.close()
    if out_path.exists():
        atomic_write_text(out_path.with_suffix(".md"), to_markdown(data))
    run.seconds = time.perf_counter() - t0
    return run


def _ordered(cells: dict, order: list[str]) -> dict:
    """Cells in the suite's order, then any others (kept from earlier runs) sorted by key."""
    pos = {k: i for i, k in enumerate(order)}
    return {k: cells[k] for k in sorted(cells, key=lambda k: (0, pos[k], "") if k in pos else (1, 0, k))}


_GROUP_FIELDS = ("method", "p", "w_bits", "a_bits", "calib", "val", "iters", "extra")


def _cells_of(results: dict) -> dict:
    return results["cells"] if isinstance(results.get("cells"), dict) else results


def summarize(results: dict) -> list[dict]:
    """Group the successful cells over calibration seeds: one row per (method, p, bits, other options).

    Args:
        results: a result file's content (``{"cells": {...}}``) or its ``cells`` mapping.

    Returns:
        rows in order of first appearance, each with the group's fields, ``seeds`` (sorted), ``n``, ``map_mean``,
        ``map_std`` (sample standard deviation over seeds; None for one seed), ``map50_mean``,
        ``ratio_to_fp_mean`` and ``wall_seconds_mean``.
    """
    groups: dict[tuple, list[dict]] = {}
    for rec in _cells_of(results).values():
        if not _is_done(rec):
            continue
        cell = rec["cell"]
        gk = tuple(tuple(v) if isinstance(v, list) else v for v in (cell.get(f) for f in _GROUP_FIELDS))
        groups.setdefault(gk, []).append(rec)
    rows = []
    for gk, recs in groups.items():
        maps = [r["map"] for r in recs]
        row = dict(zip(_GROUP_FIELDS, gk))
        row["extra"] = tuple(row["extra"] or ())
        row.update(seeds=sorted(r["cell"]["seed"] for r in recs), n=len(recs), map_mean=statistics.fmean(maps),
                   map_std=statistics.stdev(maps) if len(maps) > 1 else None,
                   map50_mean=statistics.fmean(r["map50"] for r in recs),
                   ratio_to_fp_mean=statistics.fmean(r["ratio_to_fp"] for r in recs),
                   wall_seconds_mean=statistics.fmean(r["wall_seconds"] for r in recs))
        rows.append(row)
    return rows


def _method_label(row: dict) -> str:
    opts = []
    if row["p"] is not None:
        opts.append(f"p={row['p']:g}")
    if row["calib"] != 64:
        opts.append(f"calib {row['calib']}")
    if row["val"] != 500:
        opts.append(f"val {row['val']}")
    if row["iters"] is not None:
        opts.append(f"iters {row['iters']}")
    opts += list(row["extra"])
    return row["method"] + (f" ({', '.join(opts)})" if opts else "")


def to_markdown(results: dict) -> str:
    """A markdown table of :func:`summarize` (mAP to 4 decimals), with the machine and any failed cells."""
    lines = []
    if "suite" in results:
        lines += [f"# Benchmark `{results['suite']}`", ""]
    m = results.get("machine")
    if m:
        lines += [f"Machine: {m.get('platform')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')} "
                  f"({m.get('torch_threads')} threads). Mean and sample std over calibration seeds; "
                  "% of FP = mean of mAP / FP mAP.", ""]
    lines += ["| method | bits | mAP50:95 mean ± std | mAP50 mean | % of FP | seeds | mean wall s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summarize(results):
        std = "n/a" if r["map_std"] is None else f"{r['map_std']:.4f}"
        lines.append(f"| {_method_label(r)} | W{r['w_bits']}A{r['a_bits']} | {r['map_mean']:.4f} ± {std} | "
                     f"{r['map50_mean']:.4f} | {100 * r['ratio_to_fp_mean']:.2f} | {r['n']} | "
                     f"{r['wall_seconds_mean']:.1f} |")
    failed = [(k, rec.get("error", "")) for k, rec in _cells_of(results).items() if not _is_done(rec)]
    if failed:
        lines += ["", "Failed cells (retried by the next run):", ""]
        lines += [f"- `{k}`: {err}" for k, err in failed]
    return "\n".join(lines) + "\n"
