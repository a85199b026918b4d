"""The benchmark harness: named cells (method x bits x calibration seed), one subprocess per cell, resumable.

A :class:`Cell` is one ``detptq-mini quantize ... --json`` run. :func:`run_suite` runs a named suite (or any list of
cells) one cell per subprocess, so that each cell's wall time and peak memory (its own ``ru_maxrss``, read with
``os.wait4``) are its own, and after every finished cell rewrites the result file atomically::

    {"suite": "full", "machine": {...}, "runs": [{"command": ..., ...}],
     "cells": {"lp-p2.5-W4A4-s0-c256-v500": {record}, ...}}

Cells already in the file with ``"status": "ok"`` are skipped, so an interrupted run resumes where it stopped (in the
same session or a later one). A failed cell (nonzero exit) is recorded with the last line of its stderr, is not counted
as done (the next run retries it), and the run goes on with the next cell. Cells equal to a done cell of another
result file can be copied from it (``reuse``). Markdown tables (:func:`to_markdown`: a row per method, a column per
bits, mean ± std over seeds, % of FP, cost, settings, the commands and the machine) are written next to the JSON;
:func:`summarize` gives the same numbers as one JSON-ready dict for the book.

The suites (:data:`SUITES`): ``full`` (the issue's comparison: every method x W8A8/W4A8/W4A4/W3A3 x 3 seeds),
``ablations`` (ODOL combination, 8-bit conventions, QDrop probability), ``simple`` (chapter 6's table) and
``quick`` (every method on a tiny slice, about a minute). Decisions of ``full``, stated in the book too:

* "best fixed p" is no cell of its own: the Lp cells cover every p of ``P_DEFAULT`` at every bits, and
  :func:`summarize` picks per bits the p with the best mean over seeds, an oracle choice made on the val set;
  Lp with p = 2.4 (not in ``P_DEFAULT``) is a cell of its own.
* every method calibrates on the same 256 images (the Reconstruction issue's setting); mAP on the 500 val images.
* BRECQ, QDrop and DetPTQ+QDrop run at W4A8, W4A4 and W3A3 (W8A8 needs no reconstruction) with one budget per bits,
  :data:`RECON_ITERS`, at the learning rates :data:`RECON_LR`.
* cheap cells come first, then the reconstruction cells of seed 0, then of seeds 1 and 2: a partial run is a table.

Command line: ``detptq-mini benchmark --suite full`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .checks import check_int, check_number, shown
from .lp import P_DEFAULT
from .utils import atomic_write_json, atomic_write_text

__all__ = ["Cell", "SUITES", "RECON_ITERS", "RECON_LR", "FULL_BITS", "SEEDS", "METHOD_NAMES", "SuiteRun", "cell_args",
           "run_cell", "run_suite", "select_cells", "load_results", "machine_info", "code_version", "summarize",
           "to_markdown"]


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
        lr_v, lr_act: ``--lr-v`` and ``--lr-act`` (the reconstruction's Adam learning rates), or None (the library's
            defaults).
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
    lr_v: float | None = None
    lr_act: float | None = None
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method or any(c.isspace() for c in self.method):
            raise ValueError(f"method={self.method!r} must be a non-empty method name without spaces")
        for name in ("w_bits", "a_bits", "seed", "calib", "val", "iters"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), allow_none=name == "iters"))
        for name in ("p", "lr_v", "lr_act"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), allow_none=True))
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
        """A stable, readable id, e.g. ``"lp-p2.5-W4A4-s0-c64-v500"`` (``-i<iters>``, ``-lrv<lr_v>``,
        ``-lra<lr_act>`` and ``+<arg>`` when set)."""
        parts = [self.method]
        if self.p is not None:
            parts.append(f"p{self.p:g}")
        parts += [self.bits, f"s{self.seed}", f"c{self.calib}", f"v{self.val}"]
        if self.iters is not None:
            parts.append(f"i{self.iters}")
        if self.lr_v is not None:
            parts.append(f"lrv{self.lr_v:g}")
        if self.lr_act is not None:
            parts.append(f"lra{self.lr_act:g}")
        key = "-".join(parts)
        for a in self.extra:
            key += "+" + a.lstrip("-")
        return key


def _simple_suite() -> list[Cell]:
    """Bits, then method (min-max, Lp with p = 1..4.5, DetPTQ), then seed: a table reads top to bottom."""
    variants = [("minmax", None), *(("lp", p) for p in P_DEFAULT), ("detptq", None)]
    return [Cell(method, w, a, seed, p=p) for w, a in ((4, 4), (4, 8)) for method, p in variants for seed in (0, 1, 2)]


#: Bit widths of the ``full`` comparison, in table order.
FULL_BITS: tuple[tuple[int, int], ...] = ((8, 8), (4, 8), (4, 4), (3, 3))
#: Calibration seeds of ``full`` and ``ablations``.
SEEDS: tuple[int, ...] = (0, 1, 2)
#: Calibration images of every cell of ``full`` and ``ablations`` (the Reconstruction issue's setting, used for every
#: method so that the rows compare on the same data), and val images of the mAP.
FULL_CALIB = 256
FULL_VAL = 500
#: The reconstruction budget (``--iters``, steps per unit) of each bits column: one budget for BRECQ, QDrop and
#: DetPTQ+QDrop alike. The bits named here are the ones that get reconstruction cells (W8A8 needs none). 1,000 steps
#: at the learning rates of :data:`RECON_LR` is the best W4A4 setting the Reconstruction issue measured (63.4 % of FP
#: for DetPTQ+QDrop, beating 2,000 steps at the library's default rates, 57.6 %) and costs half as much.
RECON_ITERS: dict[str, int] = {"W4A8": 1000, "W4A4": 1000, "W3A3": 1000}
#: The Adam learning rates (``--lr-v``, ``--lr-act``) of every reconstruction cell of ``full`` and ``ablations``:
#: 10x the library's defaults (1e-3, 4e-5: the reference implementations' rates, sized for 20,000 steps).
RECON_LR: tuple[float, float] = (0.01, 0.001)
#: The reconstruction methods, in table order.
RECON_METHODS: tuple[str, ...] = ("brecq", "qdrop", "detptq-qdrop")
#: The fixed p of range search common in the literature; a cell of its own (it is not in ``P_DEFAULT``).
LP_EXTRA_P = 2.4
#: The ODOL combinations (classification, localization) of the selection ablation; the first is the default.
ODOL_COMBOS: tuple[tuple[str, str], ...] = (("kl", "l1"), ("kl", "iou"), ("l2", "l1"), ("l2", "iou"))
#: DetPTQ+QDrop with every activation element quantized during reconstruction (BRECQ's setting).
QUANT_PROB_ONE: tuple[str, ...] = ("--quant-prob", "1")
#: The 8-bit conventions turned off in the ablation: stem alone, prediction convs alone, both.
EIGHT_BIT_OFF: tuple[tuple[str, ...], ...] = (("--no-8bit-stem",), ("--no-8bit-pred",),
                                              ("--no-8bit-stem", "--no-8bit-pred"))
#: Each unit's reconstruction loss divided by its value before reconstruction (the ``loss-norm`` experiment).
LOSS_NORM_BEFORE: tuple[str, ...] = ("--loss-norm", "before")


def _bits_pair(bits: str) -> tuple[int, int]:
    w, a = bits[1:].split("A")
    return int(w), int(a)


def _recon_opts(bits: str) -> dict:
    """The reconstruction budget of a bits column as :class:`Cell` fields (``iters``, ``lr_v``, ``lr_act``)."""
    return {"iters": RECON_ITERS[bits], "lr_v": RECON_LR[0], "lr_act": RECON_LR[1]}


def _full_suite() -> list[Cell]:
    """The full comparison, cheap cells first so that a partial run is already a table.

    Order: every simple cell (min-max, Lp with each p in ``P_DEFAULT`` and with p = 2.4, DetPTQ simple) for every
    bits of :data:`FULL_BITS` and seed; then the reconstruction cells (BRECQ, QDrop, DetPTQ+QDrop at the bits of
    :data:`RECON_ITERS`, each at its budget) of seed 0, then of seed 1, then of seed 2.
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL}
    simple = [("minmax", None), *(("lp", p) for p in P_DEFAULT), ("lp", LP_EXTRA_P), ("detptq", None)]
    cells = [Cell(m, w, a, s, p=p, **opts) for w, a in FULL_BITS for m, p in simple for s in SEEDS]
    cells += [Cell(m, *_bits_pair(bits), s, **_recon_opts(bits), **opts)
              for s in SEEDS for bits in RECON_ITERS for m in RECON_METHODS]
    return cells


def _ablation_suite() -> list[Cell]:
    """The ablations, cheap cells first (W4A4, the informative bits, before W4A8), then the reconstruction cells seed
    by seed.

    * ODOL combination of DetPTQ's selection at W4A4 and W4A8: KL+L1 (the default: the plain ``detptq`` cell, the
      same as in ``full``), KL+IoU, L2+L1, L2+IoU (``--odol-cls``, ``--odol-loc``).
    * 8-bit conventions at W4A4: DetPTQ simple with the stem, the prediction convs, or both at the target bits
      (on: the plain cell above); DetPTQ+QDrop with both off, against the plain cell (on).
    * QDrop probability at W4A4: QDrop (0.5) against BRECQ (1.0), same scales, budget and loss; and DetPTQ+QDrop
      at 0.5 (the plain cell) against 1.0 (``--quant-prob 1``: DetPTQ's p inside BRECQ).

    Every setting but the ablated one is that of ``full`` (calibration images, val images, budget), so the cells
    equal to a ``full`` cell have its key and can be copied from its result file (``--reuse``).
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL}
    odol = [() if (c, l) == ODOL_COMBOS[0] else ("--odol-cls", c, "--odol-loc", l) for c, l in ODOL_COMBOS]
    cells = [Cell("detptq", 4, 4, s, extra=e, **opts) for e in odol for s in SEEDS]
    cells += [Cell("detptq", 4, 4, s, extra=e, **opts) for e in EIGHT_BIT_OFF for s in SEEDS]
    cells += [Cell("detptq", 4, 8, s, extra=e, **opts) for e in odol for s in SEEDS]
    opts.update(_recon_opts("W4A4"))
    for s in SEEDS:
        cells += [Cell("brecq", 4, 4, s, **opts), Cell("qdrop", 4, 4, s, **opts), Cell("detptq-qdrop", 4, 4, s, **opts),
                  Cell("detptq-qdrop", 4, 4, s, extra=QUANT_PROB_ONE, **opts),
                  Cell("detptq-qdrop", 4, 4, s, extra=EIGHT_BIT_OFF[-1], **opts)]
    return cells


def _loss_norm_suite() -> list[Cell]:
    """The loss-scale experiment at W4A4, seed by seed: does DetPTQ's per-unit p lose to p = 2 inside reconstruction
    because the Lp loss's scale (which spans orders of magnitude across units and p) moves its balance with
    AdaRound's regulariser, whose weight ``lam`` is fixed?

    For each seed, the four reconstruction settings of ``full`` and ``ablations`` at W4A4 (BRECQ; DetPTQ+QDrop at
    ``--quant-prob 1``, DetPTQ's p inside BRECQ; QDrop; DetPTQ+QDrop) as they are (cells equal to those of ``full``
    and ``ablations``: copy them with ``--reuse``), then the same four with ``--loss-norm before``.
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL, **_recon_opts("W4A4")}
    settings = [("brecq", ()), ("detptq-qdrop", QUANT_PROB_ONE), ("qdrop", ()), ("detptq-qdrop", ())]
    return [Cell(m, 4, 4, s, extra=e + norm, **opts)
            for s in SEEDS for norm in ((), LOSS_NORM_BEFORE) for m, e in settings]


def _quick_suite() -> list[Cell]:
    """Every method kind once on a tiny slice (8 calibration images, 50 val images, 5 reconstruction steps)."""
    opts = {"calib": 8, "val": 50}
    return [Cell("minmax", 4, 8, 0, **opts), Cell("lp", 4, 8, 0, p=2.0, **opts),
            Cell("detptq", 4, 8, 0, extra=("--odol-cls", "l2", "--odol-loc", "iou"), **opts),
            Cell("brecq", 4, 4, 0, iters=5, **opts), Cell("qdrop", 4, 4, 0, iters=5, **opts),
            Cell("detptq-qdrop", 4, 4, 0, iters=5, extra=EIGHT_BIT_OFF[-1], **opts)]


#: The named suites (``benchmarks/README.md`` has their cell counts and costs).
#:
#: * ``full`` (159 cells): min-max, Lp with every p in ``P_DEFAULT`` = {1, ..., 4.5} and with p = 2.4, DetPTQ simple,
#:   BRECQ, QDrop and DetPTQ+QDrop at W8A8, W4A8, W4A4, W3A3 with calibration seeds 0, 1, 2; 256 calibration
#:   images for every method, mAP on the 500 val images. Reconstruction only below 8 bits, at the budget of
#:   :data:`RECON_ITERS` for its bits and the learning rates :data:`RECON_LR`. "Best fixed p" is not a cell:
#:   :func:`summarize` picks, per bits, the p of
#:   ``P_DEFAULT`` with the best mean mAP over seeds (an oracle choice made on the val set).
#: * ``ablations`` (48 cells): see :func:`_ablation_suite`; the p-with-and-without-V ablation is the script
#:   ``benchmarks/rounding_ablation.py``.
#: * ``loss-norm`` (24 cells): see :func:`_loss_norm_suite`.
#: * ``simple`` (60 cells): min-max, every fixed p of ``P_DEFAULT`` and DetPTQ at W4A4 and W4A8, seeds 0, 1, 2, 64
#:   calibration images (the chapter 6 table).
#: * ``quick`` (6 cells): every method once on a tiny slice, a smoke test of the harness (about a minute).
SUITES: dict[str, list[Cell]] = {
    "simple": _simple_suite(),
    "full": _full_suite(),
    "ablations": _ablation_suite(),
    "loss-norm": _loss_norm_suite(),
    "quick": _quick_suite(),
}


def cell_args(cell: Cell, device: str = "cpu") -> list[str]:
    """The ``detptq-mini`` arguments of a cell (``quantize ... --json``)."""
    args = ["quantize", "--method", cell.method, "--w-bits", str(cell.w_bits), "--a-bits", str(cell.a_bits),
            "--seed", str(cell.seed), "--calib", str(cell.calib), "--val", str(cell.val)]
    if cell.p is not None:
        args += ["--p", f"{cell.p:g}"]
    if cell.iters is not None:
        args += ["--iters", str(cell.iters)]
    if cell.lr_v is not None:
        args += ["--lr-v", f"{cell.lr_v:g}"]
    if cell.lr_act is not None:
        args += ["--lr-act", f"{cell.lr_act:g}"]
    return [*args, *cell.extra, "--device", str(device), "--json"]


def _maxrss_mb(ru_maxrss: int) -> float:
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 2**10  # bytes on macOS, KiB elsewhere


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_cell(cell: Cell, device: str = "cpu") -> dict:
    """Run one cell in a fresh ``python -m detptq_mini.cli`` process; return its record.

    The record holds ``key``, ``cell`` (the fields), ``status`` (``"ok"`` or ``"failed"``), ``returncode``,
    ``wall_seconds``, ``cpu_seconds``, ``peak_rss_mb`` (the child's own peak resident memory, from ``os.wait4``) and
    ``load_avg`` (the machine's 1, 5 and 15 minute load averages when the cell ended: the cell itself adds about its
    thread count, so a higher 15-minute load says the machine was shared and the wall time is inflated),
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
           "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "peak_rss_mb": round(_maxrss_mb(ru.ru_maxrss), 1),
           "load_avg": _load_avg()}
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def code_version() -> str | None:
    """The git commit of the library's checkout, with ``"+dirty"`` if it has uncommitted changes (None outside git).

    Logged with every run of a suite: a file made over several sessions says which code made which cells.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    """Where the numbers were measured: platform, CPU model and count, memory, Python, torch version and threads."""
    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_model(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "memory_gb": _memory_gb(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def load_results(path: str | os.PathLike, argument: str = "out") -> dict | None:
    """The result file at ``path`` (None if missing), checked for the ``{"suite", "machine", "cells"}`` layout.

    ``argument`` names the path in errors (``out``, ``reuse``).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown(argument, str(path))} is not a JSON file ({e}); move it away or choose another "
                         "file") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), dict) or "suite" not in data:
        raise ValueError(f"{shown(argument, str(path))} is not a benchmark result file (no 'suite' and 'cells')")
    return data


@dataclass
class SuiteRun:
    """What :func:`run_suite` did: the results as written, and which cells ran, were reused, skipped, failed."""

    results: dict
    out_path: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line: cells run, reused (when any), skipped, failed."""
        reused = f"{len(self.reused)} reused, " if self.reused else ""
        return (f"benchmark {self.results['suite']}: {len(self.ran)} run, {reused}{len(self.skipped)} skipped, "
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


def select_cells(name_or_cells, only: str | None = None, exclude: str | None = None,
                 argument_names: dict[str, str] | None = None) -> tuple[str, list[Cell]]:
    """The suite's name and cells, keeping those whose key contains ``only`` and not ``exclude`` (error if none is
    left), e.g. ``exclude="-i"``: every cell but the reconstruction cells.

    ``argument_names`` renames ``only`` and ``exclude`` in errors: the CLI passes ``{"only": "--only", "exclude":
    "--exclude"}``. A name that starts with ``-`` (a command-line flag) is written ``--only 'W4A4'``, as the CLI's own
    errors; the others ``only='W4A4'``.
    """
    names = {"only": "only", "exclude": "exclude", **(argument_names or {})}

    def show(arg: str, value) -> str:
        return shown(names[arg], value)

    name, cells = _suite_cells(name_or_cells)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the cells' keys are not unique: each cell must differ")
    for arg, value in (("only", only), ("exclude", exclude)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{show(arg, value)} must be a non-empty substring of cell keys or None")
    if only is not None:
        cells = [c for c in cells if only in c.key]
    if exclude is not None:
        cells = [c for c in cells if exclude not in c.key]
    if not cells:
        what = " and ".join(show(a, v) for a, v in (("only", only), ("exclude", exclude)) if v is not None)
        raise ValueError(f"{what} leaves no cell of suite {name!r} (see `detptq-mini benchmark --list`)")
    return name, cells


def _reusable(reuse) -> dict[str, dict]:
    """key -> a copy of its successful record in the first of the ``reuse`` files that holds it."""
    paths = [reuse] if isinstance(reuse, (str, os.PathLike)) else list(reuse or ())
    found: dict[str, dict] = {}
    for path in paths:
        data = load_results(path, "reuse")
        if data is None:
            raise ValueError(f"reuse={str(path)!r} does not exist; it must be a result file of another run")
        for key, rec in data["cells"].items():
            if _is_done(rec) and key not in found:
                rec = dict(rec)
                rec.setdefault("machine", data.get("machine"))  # the record says where it was measured
                rec["reused_from"] = str(path)
                found[key] = rec
    return found


def run_suite(name_or_cells, out_path: str | os.PathLike, progress: bool = False, only: str | None = None,
              device: str = "cpu", reuse=(), command: str | None = None, exclude: str | None = None) -> SuiteRun:
    """Run every cell of a suite not already done in ``out_path``, one subprocess each; resumable.

    Args:
        name_or_cells: a key of :data:`SUITES`, or a list of :class:`Cell` (the suite is then called ``"custom"``).
        out_path: the JSON result file (its directory must exist). Loaded if present (it must be of the same suite);
            rewritten atomically after every cell, with a markdown table (:func:`to_markdown`) next to it.
        progress: show a tqdm progress bar (on stderr).
        only: run only the cells whose key contains this substring.
        exclude: skip the cells whose key contains this substring (e.g. ``"-i"``: the reconstruction cells).
        device: passed to each cell's ``--device``.
        reuse: result files (a path or a list of paths) of other runs: a cell to do whose key is there with
            ``"status": "ok"`` is copied from there instead of run (the key fixes every option of the command, so
            it is the same measurement); the copy keeps its measurements and ``machine`` and says
            ``"reused_from"``. E.g. the ``ablations`` cells that equal ``full`` cells.
        command: how this run was started, logged in the file's ``runs`` (the command line passes its own;
            default: a description of this call).

    Returns:
        a :class:`SuiteRun` (``.failed`` non-empty if any cell failed; those cells are retried by the next run).

    Every run that does at least one cell appends ``{"command", "started", "code", "seconds", "ran", "reused",
    "failed"}`` to the file's ``runs`` (updated after every cell; ``code`` is :func:`code_version`), so a file made
    over several sessions says how, and with which code.
    """
    t0 = time.perf_counter()
    name, cells = select_cells(name_or_cells, only, exclude)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ValueError(f"out_path={str(out_path)!r}: directory {str(out_path.parent)!r} does not exist")
    reusable = _reusable(reuse)
    machine = machine_info()
    data = load_results(out_path)
    if data is None:
        data = {"suite": name, "machine": machine, "runs": [], "cells": {}}
    elif data["suite"] != name:
        raise ValueError(f"out_path={str(out_path)!r} holds suite {data['suite']!r}, not {name!r}; choose another out")
    all_keys = [c.key for c in _suite_cells(name_or_cells)[1]]
    done = [c for c in cells if _is_done(data["cells"].get(c.key))]
    todo = [c for c in cells if not _is_done(data["cells"].get(c.key))]
    run = SuiteRun(results=data, out_path=out_path, skipped=[c.key for c in done])
    if command is None:
        command = f"python: run_suite({name!r}" + "".join(f", {a}={v!r}" for a, v in (("only", only), ("exclude", exclude))
                                                           if v is not None) + ")"
    entry = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "code": code_version(), "seconds": 0.0, "ran": 0, "reused": 0, "failed": 0}
    runs = list(data.get("runs") or [])

    from tqdm.auto import tqdm

    bar = tqdm(todo, desc=f"benchmark {name}", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        if cell.key in reusable:
            rec = reusable[cell.key]
            run.reused.append(cell.key)
        else:
            rec = run_cell(cell, device=device)
            if data.get("machine") != machine:
                rec["machine"] = machine  # resumed on another machine: say so on the cells measured here
            (run.ran if rec["status"] == "ok" else run.failed).append(cell.key)
        cells_now = dict(data["cells"])
        cells_now[cell.key] = rec
        entry.update(seconds=round(time.perf_counter() - t0, 1), ran=len(run.ran), reused=len(run.reused),
                     failed=len(run.failed))
        data = {"suite": name, "machine": data.get("machine", machine), "runs": [*runs, dict(entry)],
                "cells": _ordered(cells_now, all_keys)}
        atomic_write_json(out_path, data)
        atomic_write_text(out_path.with_suffix(".md"), to_markdown(data))  # a stopped run leaves both in step
        run.results = data
    bar.close()
    if out_path.exists() and not todo:
        atomic_write_text(out_path.with_suffix(".md"), to_markdown(data))
    run.seconds = time.perf_counter() - t0
    return run


def _ordered(cells: dict, order: list[str]) -> dict:
    """Cells in the suite's order, then any others (kept from earlier runs) sorted by key."""
    pos = {k: i for i, k in enumerate(order)}
    return {k: cells[k] for k in sorted(cells, key=lambda k: (0, pos[k], "") if k in pos else (1, 0, k))}


# ---------------------------------------------------------------------------------------------------- summaries
#: Display names of the methods, in table order (unknown methods follow, in order of appearance).
METHOD_NAMES: dict[str, str] = {"minmax": "min-max", "lp": "Lp", "detptq": "DetPTQ simple", "brecq": "BRECQ",
                                "qdrop": "QDrop", "detptq-qdrop": "DetPTQ+QDrop"}
_GROUP_FIELDS = ("method", "p", "w_bits", "a_bits", "calib", "val", "iters", "lr_v", "lr_act", "extra")
_ODOL_NAMES = {"kl": "KL", "l2": "L2", "l1": "L1", "iou": "IoU"}


def _cells_of(results: dict) -> dict:
    return results["cells"] if isinstance(results.get("cells"), dict) else results


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _seed_groups(cells: dict) -> list[dict]:
    """The successful records grouped over seeds: one per (method, p, bits, calib, val, budget, extra).

    The budget is (iters, lr_v, lr_act); records made before the learning rates were cell fields have None there.
    """
    groups: dict[tuple, list[dict]] = {}
    for rec in cells.values():
        if not _is_done(rec):
            continue
        cell = rec["cell"]
        gk = tuple(tuple(v) if isinstance(v, list) else v for v in (cell.get(f) for f in _GROUP_FIELDS))
        groups.setdefault(gk, []).append(rec)
    out = []
    for gk, recs in groups.items():
        recs = sorted(recs, key=lambda r: r["cell"]["seed"])
        g = dict(zip(_GROUP_FIELDS, gk))
        g["extra"] = list(g["extra"] or ())
        g["bits"] = f"W{g['w_bits']}A{g['a_bits']}"
        maps, maps50 = [r["map"] for r in recs], [r["map50"] for r in recs]
        peaks = [r.get("peak_rss_mb") for r in recs if r.get("peak_rss_mb") is not None]
        g["stats"] = {
            "n": len(recs), "seeds": [r["cell"]["seed"] for r in recs], "keys": [r["key"] for r in recs],
            "map_mean": statistics.fmean(maps), "map_std": _std(maps),
            "map50_mean": statistics.fmean(maps50), "map50_std": _std(maps50),
            "ratio_to_fp_mean": statistics.fmean(r["ratio_to_fp"] for r in recs),
            "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in recs),
            "cpu_seconds_mean": _mean(r.get("cpu_seconds") for r in recs),
            "peak_rss_mb_max": max(peaks) if peaks else None,
            "calib": g["calib"], "val": g["val"], "iters": g["iters"], "lr_v": g["lr_v"], "lr_act": g["lr_act"],
        }
        g["budget"] = (g["iters"], g["lr_v"], g["lr_act"])
        out.append(g)
    return out


def _options(extra) -> list[tuple[str, str | None]]:
    """``["--odol-cls", "l2", "--no-8bit-stem"]`` -> ``[("--odol-cls", "l2"), ("--no-8bit-stem", None)]``."""
    out, i = [], 0
    while i < len(extra):
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append((extra[i], extra[i + 1]))
            i += 2
        else:
            out.append((extra[i], None))
            i += 1
    return out


def _extra_label(extra) -> list[str]:
    """Readable names of a cell's extra ``quantize`` arguments (ODOL combination, 8-bit conventions off, ...)."""
    opts = dict(_options(extra))
    labels = []
    if "--odol-cls" in opts or "--odol-loc" in opts:
        cls, loc = opts.pop("--odol-cls", "kl"), opts.pop("--odol-loc", "l1")
        labels.append(f"ODOL {_ODOL_NAMES.get(cls, cls)}+{_ODOL_NAMES.get(loc, loc)}")
    stem, pred = "--no-8bit-stem" in opts, "--no-8bit-pred" in opts
    opts.pop("--no-8bit-stem", None), opts.pop("--no-8bit-pred", None)
    if stem or pred:
        labels.append("8-bit " + "/".join(n for n, off in (("stem", stem), ("pred", pred)) if off) + " off")
    labels += [flag.lstrip("-").replace("-", " ") + ("" if v is None else f" {v}") for flag, v in opts.items()]
    return labels


def _bits_order(bits: str) -> tuple[int, int]:
    w, a = _bits_pair(bits)
    return -w, -a  # W8A8, W4A8, W4A4, W3A3


def summarize(results: dict) -> dict:
    """The tables of a result file as one JSON-ready dict: rows are methods (with options), columns are bits.

    Args:
        results: a result file's content (``{"suite", "machine", "runs", "cells"}``) or its ``cells`` mapping.

    Returns:
        ``{"suite", "machine", "commands", "progress", "fp", "bits", "rows", "failed", "excluded"}``:

        * ``bits``: the bits columns (``"W8A8"``, ``"W4A8"``, ...), widest first;
        * ``rows``: one per method and options, in table order (min-max, Lp by p, best fixed p, DetPTQ simple,
          BRECQ, QDrop, DetPTQ+QDrop; rows with extra options after the plain one), each ``{"label", "method",
          "p", "calib", "val", "extra", "best_fixed_p", "cells"}`` where ``cells`` maps a bits column to ``{"n",
          "seeds", "keys", "map_mean", "map_std", "map50_mean", "map50_std", "ratio_to_fp_mean",
          "wall_seconds_mean", "cpu_seconds_mean", "peak_rss_mb_max", "calib", "val", "iters"}`` over the
          successful cells (stds are sample standard deviations over seeds, None for one seed). Calibration
          and val images are in the label only when they differ between rows; rows differing only in ``iters``
          at the same bits are split, with the budget in the label.
        * the ``best_fixed_p`` row (after the Lp rows, when at least two p of ``P_DEFAULT`` have results at a
          bits): per bits, the Lp row with p in ``P_DEFAULT`` whose mean mAP50:95 over seeds is highest, with
          its ``p`` and every candidate's mean in ``candidates``. This is an oracle choice made on the val set
          that also measures it: an optimistic bound on any fixed p.
        * ``fp``: the FP reference ``{"val", "map", "map50"}`` per val-set size; ``progress``: ``{"cells", "ok",
          "failed", "todo"}`` against the suite's current definition (or the file alone for ``"custom"``);
          ``excluded``: keys of records in the file that are not in the suite's current definition (e.g. an
          earlier iteration budget), left out of the rows; ``failed``: ``[{"key", "error"}]``; ``commands``:
          the distinct commands of the file's ``runs`` with how often each ran.
    """
    cells = _cells_of(results)
    suite = results.get("suite") if "cells" in results else None
    expected = [c.key for c in SUITES[suite]] if suite in SUITES else None
    if expected is not None:
        excluded = [k for k in cells if k not in set(expected)]
        used = {k: rec for k, rec in cells.items() if k in set(expected)}
        n_ok = sum(_is_done(cells.get(k)) for k in expected)
        n_failed = sum(k in cells and not _is_done(cells[k]) for k in expected)
        progress = {"cells": len(expected), "ok": n_ok, "failed": n_failed, "todo": len(expected) - n_ok - n_failed}
    else:
        excluded, used = [], dict(cells)
        n_ok = sum(_is_done(r) for r in cells.values())
        progress = {"cells": len(cells), "ok": n_ok, "failed": len(cells) - n_ok, "todo": 0}
    groups = _seed_groups(used)

    # rows: (method, p, calib, val, extra), split by budget where one bits column would get two budgets
    def rid(g):
        return g["method"], g["p"], g["calib"], g["val"], tuple(g["extra"])

    per_cell: dict[tuple, set] = {}
    for g in groups:
        per_cell.setdefault((rid(g), g["bits"]), set()).add(g["budget"])
    split = {r for (r, _), budgets in per_cell.items() if len(budgets) > 1}
    rows: dict[tuple, dict] = {}
    for g in groups:
        r = rid(g) + (g["budget"] if rid(g) in split else ())
        iters, lr_v, lr_act = g["budget"] if rid(g) in split else (None, None, None)
        row = rows.setdefault(r, {"method": g["method"], "p": g["p"], "calib": g["calib"], "val": g["val"],
                                  "extra": g["extra"], "iters": iters, "lr_v": lr_v, "lr_act": lr_act,
                                  "best_fixed_p": False, "cells": {}})
        row["cells"][g["bits"]] = g["stats"]
    rows_list = list(rows.values())

    # best fixed p: per family (calib, val, extra) of Lp rows and per bits, the p of P_DEFAULT with the best mean
    families: dict[tuple, list[dict]] = {}
    for row in rows_list:
        if row["method"] == "lp" and row["p"] in P_DEFAULT and row["iters"] is None:
            families.setdefault((row["calib"], row["val"], tuple(row["extra"])), []).append(row)
    for (calib, val, extra), lp_rows in families.items():
        best_cells = {}
        for bits in {b for row in lp_rows for b in row["cells"]}:
            cand = sorted((row["p"], row["cells"][bits]) for row in lp_rows if bits in row["cells"])
            if len(cand) < 2:
                continue
            p, stats = max(cand, key=lambda c: c[1]["map_mean"])  # the first (smallest p) of equal means
            best_cells[bits] = {**stats, "p": p, "candidates": {f"{q:g}": s["map_mean"] for q, s in cand}}
        if best_cells:
            rows_list.append({"method": "lp", "p": None, "calib": calib, "val": val, "extra": list(extra),
                              "iters": None, "lr_v": None, "lr_act": None, "best_fixed_p": True,
                              "cells": best_cells})

    rank = {m: i for i, m in enumerate(METHOD_NAMES)}
    for row in rows_list:
        rank.setdefault(row["method"], len(rank))
    variant: dict[tuple, int] = {}
    for row in rows_list:
        variant.setdefault(_variant(row), len(variant))
    rows_list.sort(key=lambda row: (rank[row["method"]], bool(row["extra"]), variant[_variant(row)],
                                    row["best_fixed_p"], -1 if row["p"] is None else row["p"]))
    vary_calib = len({row["calib"] for row in rows_list}) > 1
    vary_val = len({row["val"] for row in rows_list}) > 1
    for row in rows_list:
        row["label"] = _row_label(row, vary_calib, vary_val)
    rows_out = [{"label": row.pop("label"), **row} for row in rows_list]

    fp: dict[int, dict] = {}
    for rec in used.values():
        if _is_done(rec) and "fp_map" in rec:
            fp.setdefault(rec["cell"]["val"], {"val": rec["cell"]["val"], "map": rec["fp_map"],
                                               "map50": rec.get("fp_map50")})
    commands: dict[str, int] = {}
    for entry in (results.get("runs") or []) if "cells" in results else []:
        commands[entry.get("command")] = commands.get(entry.get("command"), 0) + 1
    return {
        "suite": suite, "machine": results.get("machine") if "cells" in results else None,
        "commands": [{"command": c, "runs": n} for c, n in commands.items()], "progress": progress,
        "fp": [fp[v] for v in sorted(fp)],
        "bits": sorted({b for row in rows_out for b in row["cells"]}, key=_bits_order),
        "rows": rows_out,
        "failed": [{"key": k, "error": rec.get("error", "") if isinstance(rec, dict) else ""}
                   for k, rec in used.items() if not _is_done(rec)],
        "excluded": excluded,
    }


def _variant(row: dict) -> tuple:
    return (row["method"], row["calib"], row["val"], tuple(row["extra"]), row["iters"], row["lr_v"], row["lr_act"])


def _budget_text(iters, lr_v=None, lr_act=None) -> str:
    """``1000`` -> ``"iters 1000"``; with learning rates ``"iters 1000, lr V 0.01, lr act 0.001"``."""
    parts = [] if iters is None else [f"iters {iters}"]
    parts += [f"{name} {v:g}" for name, v in (("lr V", lr_v), ("lr act", lr_act)) if v is not None]
    return ", ".join(parts)


def _row_label(row: dict, vary_calib: bool, vary_val: bool) -> str:
    if row["best_fixed_p"]:
        name = "Lp, best fixed p (oracle)"
    elif row["method"] == "lp":
        name = f"Lp p={row['p']:g}"
    else:
        name = METHOD_NAMES.get(row["method"], row["method"])
        if row["p"] is not None:
            name += f" p={row['p']:g}"
    opts = _extra_label(row["extra"])
    if vary_calib:
        opts.append(f"calib {row['calib']}")
    if vary_val:
        opts.append(f"val {row['val']}")
    if any(row[k] is not None for k in ("iters", "lr_v", "lr_act")):
        opts.append(_budget_text(row["iters"], row["lr_v"], row["lr_act"]))
    return name + (f" ({', '.join(opts)})" if opts else "")


def _pm(mean, std, n) -> str:
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}") + f" ({n})"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 100 else f"{s:.0f} s"


def _machine_line(m: dict) -> str:
    mem = f", {m['memory_gb']:g} GB RAM" if m.get("memory_gb") else ""
    cpu = f", {m['processor']}" if m.get("processor") else ""
    return (f"{m.get('platform')}{cpu}, {m.get('cpu_count')} CPUs{mem}; Python {m.get('python')}, "
            f"torch {m.get('torch')} ({m.get('torch_threads')} threads)")


def to_markdown(results: dict) -> str:
    """The markdown of :func:`summarize`: tables with a row per method and a column per bits, then notes.

    Tables: mAP50:95 and mAP50 (mean ± sample std over calibration seeds, number of seeds), % of the FP mAP50:95,
    the cost of a cell (mean wall time, largest peak memory over seeds) and the settings of each row (calibration
    and val images, reconstruction budget per bits). Then the best-fixed-p choice, failed and excluded cells, and
    the footer: the commands that made the file and the machine. mAP to 4 decimals.
    """
    s = summarize(results)
    bits, rows = s["bits"], s["rows"]
    lines = [f"# Benchmark `{s['suite']}`" if s["suite"] else "# Benchmark", ""]
    pr = s["progress"]
    lines += [f"Cells: {pr['ok']} of {pr['cells']} done" + (f", {pr['failed']} failed" if pr["failed"] else "")
              + (f", {pr['todo']} to do" if pr["todo"] else "") + ". Every number below is over the successful "
              "cells; a table entry is the mean (± sample standard deviation) over calibration seeds, with the "
              "number of seeds in parentheses; — means no cell.", ""]
    if s["fp"]:
        lines += ["FP reference (the shipped model): " + "; ".join(
            f"mAP50:95 {f['map']:.4f}, mAP50 {f['map50']:.4f} on {f['val']} val images" if f["map50"] is not None
            else f"mAP50:95 {f['map']:.4f} on {f['val']} val images" for f in s["fp"]) + ".", ""]

    def table(title, fmt):
        out = [f"## {title}", "", "| method | " + " | ".join(bits) + " |", "| --- |" + " --- |" * len(bits)]
        for row in rows:
            out.append(f"| {row['label']} | " + " | ".join(fmt(row, row["cells"][b]) if b in row["cells"] else "—"
                                                          for b in bits) + " |")
        return out + [""]

    def best(row, c):
        return f", p={c['p']:g}" if row["best_fixed_p"] else ""

    if rows:
        lines += table("mAP50:95", lambda row, c: _pm(c["map_mean"], c["map_std"], c["n"]) + best(row, c))
        lines += table("mAP50", lambda row, c: _pm(c["map50_mean"], c["map50_std"], c["n"]))
        lines += table("% of FP mAP50:95 (mean over seeds of mAP / FP mAP)",
                       lambda row, c: f"{100 * c['ratio_to_fp_mean']:.2f}" + best(row, c))
        lines += table("Cost per cell (mean wall time of the whole subprocess; peak memory, the largest over seeds)",
                       lambda row, c: "the Lp rows" if row["best_fixed_p"] else _seconds(c["wall_seconds_mean"]) + (
                           "" if c["peak_rss_mb_max"] is None else f", {c['peak_rss_mb_max']:.0f} MB"))
        lines += ["## Settings", "", "| method | calibration images | val images | reconstruction budget "
                  "(steps per unit; Adam learning rates of V and of the activation steps when not the defaults) |",
                  "| --- | --- | --- | --- |"]
        for row in rows:
            budgets = {b: _budget_text(c["iters"], c.get("lr_v"), c.get("lr_act"))
                       for b, c in row["cells"].items() if c["iters"] is not None}
            its = ("—" if not budgets else next(iter(budgets.values())) if len(set(budgets.values())) == 1
                   else "; ".join(f"{b}: {budgets[b]}" for b in bits if b in budgets))
            lines.append(f"| {row['label']} | {row['calib']} | {row['val']} | {its} |")
        lines.append("")
    if any(row["best_fixed_p"] for row in rows):
        lines += [f"Best fixed p: per bits, the Lp row with p in P = {{{', '.join(f'{p:g}' for p in P_DEFAULT)}}} "
                  "with the highest mean mAP50:95 over seeds. This is an oracle choice made on the val set that also "
                  "measures it, so it is an optimistic bound for any one fixed p.", ""]
    if s["failed"]:
        lines += ["Failed cells (retried by the next run):", ""]
        lines += [f"- `{f['key']}`: {f['error']}" for f in s["failed"]] + [""]
    if s["excluded"]:
        lines += [f"{len(s['excluded'])} cells in the file are not in the suite's current definition (e.g. an "
                  "earlier budget) and are left out: " + ", ".join(f"`{k}`" for k in s["excluded"]) + ".", ""]
    if s["commands"]:
        made = "; ".join(f"`{c['command']}`" + (f" ({c['runs']} runs)" if c["runs"] > 1 else "") for c in s["commands"])
        lines.append(f"Made by: {made} (each run and its duration: `runs` in the JSON).")
    if s["commands"]:
        lines.append("")
    if s["machine"]:
        lines.append(f"Machine: {_machine_line(s['machine'])}.")
        others = sum(1 for rec in _cells_of(results).values()
                     if isinstance(rec, dict) and rec.get("machine") not in (None, s["machine"]))
        if others:
            lines.append(f"{others} cells were measured elsewhere (reused or resumed on another machine: their "
                         "`machine` in the JSON).")
    return "\n".join(lines).rstrip("\n") + "\n"
