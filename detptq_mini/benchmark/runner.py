"""Running the benchmark: one subprocess per cell, resumable, every run logged.

:func:`run_suite` runs a named suite (or any list of cells) one cell per subprocess (:func:`run_cell`), so that each
cell's wall time and peak memory (its own ``ru_maxrss``, read with ``os.wait4``) are its own, one cell at a time or
``jobs`` cells at once (each child then with its share of torch's threads, so that the cells do not fight over the
cores), and after every finished cell rewrites the result file atomically (from this process only)::

    {"suite": "full", "machine": {...}, "runs": [{"command": ..., ...}],
     "cells": {"lp-p2.5-W4A4-s0-c256-v500": {record}, ...}}

with the markdown of :func:`detptq_mini.benchmark.report.to_markdown` next to it. Cells already in the file with
``"status": "ok"`` are skipped, so an interrupted run resumes where it stopped (in the same session or a later one). A
failed cell (nonzero exit) is recorded with the last line of its stderr, is not counted as done (the next run retries
it), and the run goes on with the next cell. Cells equal to a done cell of another result file can be copied from it
(``reuse``). Every run logs its command and the code's commit (:func:`code_version`) in the file's ``runs``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checks import check_int, shown
from ..utils import atomic_write_json, atomic_write_text
from .report import to_markdown
from .suites import RECON_METHODS, Cell, is_done, select_cells, suite_cells

__all__ = ["cell_args", "run_cell", "code_version", "machine_info", "load_results", "SuiteRun", "run_suite",
           "ordered_cells"]


def cell_args(cell: Cell, device: str = "cpu", threads: int | None = None, state: str | None = None) -> list[str]:
    """The ``detptq-mini`` arguments of a cell (``quantize ... --json``); with ``threads``, ``--threads`` too, and
    with ``state`` (a file path), ``--state`` (the run's progress, to resume a stopped cell)."""
    model = ["--model", cell.model] if cell.model != "yolo" else []  # yolo: the command of every earlier cell
    args = ["quantize", *model, "--method", cell.method, "--w-bits", str(cell.w_bits), "--a-bits", str(cell.a_bits),
            "--seed", str(cell.seed), "--calib", str(cell.calib), "--val", str(cell.val)]
    if cell.p is not None:
        args += ["--p", f"{cell.p:g}"]
    if cell.iters is not None:
        args += ["--iters", str(cell.iters)]
    if cell.lr_v is not None:
        args += ["--lr-v", f"{cell.lr_v:g}"]
    if cell.lr_act is not None:
        args += ["--lr-act", f"{cell.lr_act:g}"]
    if threads is not None:
        args += ["--threads", str(threads)]
    if state is not None:
        args += ["--state", str(state)]
    return [*args, *cell.extra, "--device", str(device), "--json"]


def _maxrss_mb(ru_maxrss: int) -> float:
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 2**10  # bytes on macOS, KiB elsewhere


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


class _Children:
    """The child processes of one :func:`run_suite` that are running now, so that an interrupted run kills them all.

    With ``jobs > 1`` each child is waited for in a worker thread, which a Ctrl-C does not reach: the main thread
    kills them with :meth:`kill_all`. After that, a child that is only now being started is killed at once.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._stopped = False

    def add(self, pid: int) -> None:
        with self._lock:
            if not self._stopped:
                self._pids.add(pid)
                return
        _kill(pid)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._pids.discard(pid)

    def kill_all(self) -> None:
        with self._lock:
            self._stopped = True
            pids = list(self._pids)
        for pid in pids:
            _kill(pid)


def _kill(pid: int) -> None:
    # os.kill, not Popen.kill: Popen.kill polls (waitpid) first and could reap the child under run_cell's os.wait4
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # already ended
        pass


def run_cell(cell: Cell, device: str = "cpu", threads: int | None = None, children=None,
             state_dir: str | os.PathLike | None = None) -> dict:
    """Run one cell in a fresh ``python -m detptq_mini.cli`` process; return its record.

    Args:
        cell: the cell.
        device: its ``--device``.
        threads: None (the child's environment untouched: torch's default threads, or ``OMP_NUM_THREADS`` if set),
            or the child's torch threads: ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in its environment and
            ``quantize --threads`` (``torch.set_num_threads``). :func:`run_suite` sets it when it runs several cells
            at once.
        children: :func:`run_suite`'s registry of running children (its way to kill them on Ctrl-C), or None.
        state_dir: None, or a directory for the progress of a reconstruction cell (``quantize --state
            <state_dir>/<key>.state``): a cell killed before it ends (a stopped session, a Ctrl-C) goes on from its
            last reconstructed unit when it is run again; the file is deleted when the cell completes. Its record
            then says ``resumed`` and counts every run's time in ``wall_seconds`` and ``cpu_seconds``.

    The record holds ``key``, ``cell`` (the fields), ``status`` (``"ok"`` or ``"failed"``), ``returncode``,
    ``wall_seconds``, ``cpu_seconds``, ``peak_rss_mb`` (the child's own peak resident memory, from ``os.wait4``),
    ``load_avg`` (the machine's 1, 5 and 15 minute load averages when the cell ended: the cell itself adds about its
    thread count, so a higher 15-minute load says the machine was shared and the wall time is inflated) and
    ``threads`` (the child's ``torch.get_num_threads()`` as it reported it; None for a failed cell),
    then every field of the command's JSON output (``map``, ``map50``, ``fp_map``, ``ratio_to_fp``, ``config``,
    ``chosen_p``, ...) when it succeeded, or ``error`` (the last line of its stderr) when it failed.
    """
    threads = check_int("threads", threads, 1, allow_none=True)
    state = None
    if state_dir is not None and cell.method in RECON_METHODS:  # a reconstruction cell: resumable unit by unit
        state = Path(state_dir) / f"{cell.key}.state"
        for tmp in Path(state_dir).glob(f".{state.name}.tmp*"):  # a save cut short by a kill
            tmp.unlink(missing_ok=True)
        for _ in range(2):  # a second try: another run may remove an empty parent between the two mkdirs
            try:
                Path(state_dir).mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                continue
    cmd = [sys.executable, "-m", "detptq_mini.cli", *cell_args(cell, device, threads, state)]
    env = None
    if threads is not None:  # OpenMP and MKL read these when torch is imported, before --threads is parsed
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        if children is not None:
            children.add(proc.pid)
        try:
            _, status, ru = os.wait4(proc.pid, 0)  # the child's own rusage, unlike RUSAGE_CHILDREN
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if children is not None:
                children.discard(proc.pid)
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    rec = {"key": cell.key, "cell": asdict(cell), "status": "ok", "returncode": rc, "wall_seconds": round(wall, 3),
           "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3), "peak_rss_mb": round(_maxrss_mb(ru.ru_maxrss), 1),
           "load_avg": _load_avg(), "threads": None, "model": cell.model}
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
        rec["threads"] = result.get("threads")  # measured in the child, after its --threads
        earlier = result.get("resumed")
        if isinstance(earlier, dict):  # the cell went on from earlier runs' progress: count their time too
            rec["wall_seconds"] = round(wall + earlier["seconds_before"], 3)
            rec["cpu_seconds"] = round(rec["cpu_seconds"] + earlier["cpu_seconds_before"], 3)
        for k, v in result.items():
            rec.setdefault(k, v)  # the harness's own fields win over a same-named output field
    return rec


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` and then its parent if they are empty (another cell's state keeps them)."""
    for f in (folder, folder.parent):
        try:
            f.rmdir()
        except OSError:  # not empty, or already gone
            return


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in /proc/cpuinfo (e.g. ``"model name"``, ``"flags"``), None where it cannot be
    read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


#: The CPU features that change a cell's numbers or speed: torch picks its kernels by them (its last digits differ
#: between AVX2 and AVX-512 machines), and ONNX Runtime's int8 convs saturate without VNNI.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def _isa() -> list[str]:
    """Which of :data:`ISA_FLAGS` the CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    have = set((_cpuinfo("flags") or "").split())
    return [f for f in ISA_FLAGS if f in have]


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def code_version() -> str | None:
    """The git commit of the library's checkout, with ``"+dirty"`` if it has uncommitted changes (None outside git).

    Logged with every run of a suite: a file made over several sessions says which code made which cells.
    """
    root = Path(__file__).resolve().parents[2]  # the checkout: detptq_mini/benchmark/runner.py -> its root
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
    """Where the numbers were measured: platform, CPU model, features (``isa``, torch's ``cpu_capability``) and
    count, memory, Python, torch version and threads. Two machines that print the same CPU model can differ in
    their vector units, and with them in the last digits of a cell's mAP."""
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_model(),
            "isa": _isa(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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
    not_started: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line: cells run, reused (when any), skipped, failed."""
        reused = f"{len(self.reused)} reused, " if self.reused else ""
        later = f", {len(self.not_started)} not started (stop_after)" if self.not_started else ""
        return (f"benchmark {self.results['suite']}: {len(self.ran)} run, {reused}{len(self.skipped)} skipped, "
                f"{len(self.failed)} failed{later} in {self.seconds:.4g} s -> {self.out_path}")



def _reusable(reuse) -> dict[str, dict]:
    """key -> a copy of its successful record in the first of the ``reuse`` files that holds it."""
    paths = [reuse] if isinstance(reuse, (str, os.PathLike)) else list(reuse or ())
    found: dict[str, dict] = {}
    for path in paths:
        data = load_results(path, "reuse")
        if data is None:
            raise ValueError(f"reuse={str(path)!r} does not exist; it must be a result file of another run")
        for key, rec in data["cells"].items():
            if is_done(rec) and key not in found:
                rec = dict(rec)
                rec.setdefault("machine", data.get("machine"))  # the record says where it was measured
                rec["reused_from"] = str(path)
                found[key] = rec
    return found


def _sigterm_as_interrupt():
    """Make SIGTERM (``kill PID``) interrupt this process as Ctrl-C does, so that :func:`run_suite` kills its
    running children instead of leaving them orphaned, and returns a function that restores the previous handler.
    A run started in the background by a script (``... &``) has SIGINT ignored, so ``kill`` is how it is stopped.
    Only the main thread can set a handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_suite(name_or_cells, out_path: str | os.PathLike, progress: bool = False, only=None,
              device: str = "cpu", reuse=(), command: str | None = None, exclude=None,
              jobs: int = 1, stop_after: float | None = None, model: str = "yolo") -> SuiteRun:
    """Run every cell of a suite not already done in ``out_path``, one subprocess each; resumable.

    Args:
        name_or_cells: a key of :data:`~detptq_mini.benchmark.suites.SUITES`, or a list of
            :class:`~detptq_mini.benchmark.suites.Cell` (the suite is then called ``"custom"``).
        out_path: the JSON result file (its directory must exist). Loaded if present (it must be of the same suite);
            rewritten atomically after every cell, with a markdown table
            (:func:`~detptq_mini.benchmark.report.to_markdown`) next to it.
        progress: show a tqdm progress bar (on stderr), with the keys of the cells running.
        only: run only the cells whose key contains this substring (or any of a list of them).
        exclude: skip the cells whose key contains this substring, or any of a list of them (e.g. ``"-i"``: the
            reconstruction cells); see :func:`~detptq_mini.benchmark.suites.select_cells`.
        device: passed to each cell's ``--device``.
        reuse: result files (a path or a list of paths) of other runs: a cell to do whose key is there with
            ``"status": "ok"`` is copied from there instead of run (the key fixes every option of the command, so
            it is the same measurement); the copy keeps its measurements and ``machine`` and says
            ``"reused_from"``. E.g. the ``ablations`` cells that equal ``full`` cells.
        command: how this run was started, logged in the file's ``runs`` (the command line passes its own;
            default: a description of this call).
        jobs: how many cells run at once (an integer >= 1). 1: one after the other, each child with torch's
            default threads (its environment untouched). More: each child gets ``max(1, T // jobs)`` torch threads,
            T being this process's ``torch.get_num_threads()`` (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
            ``quantize --threads``; see :func:`run_cell`), so that the cells share the cores instead of fighting
            over them; their wall times are then those of a shared machine. Only this process writes the file,
            after each finished cell, with the cells in the suite's order whatever order they finish in.
        stop_after: start no cell (nor copy one) once this many minutes (a number > 0) have passed since the call;
            the cells running then finish and are recorded, the rest are listed in ``.not_started`` for the next
            run (which resumes). None (default): run every cell. For compute that must end with a session.
        model: a named suite's cells run on this detector (:func:`~detptq_mini.benchmark.suites.on_model`;
            ``"yolo"``, the default, leaves them and their keys as they are).

    Returns:
        a :class:`SuiteRun` (``.failed`` non-empty if any cell failed; those cells are retried by the next run).

    Every run that does at least one cell appends ``{"command", "started", "code", "jobs", "seconds", "ran",
    "reused", "failed"}`` to the file's ``runs`` (updated after every cell; ``code`` is :func:`code_version`), so a
    file made over several sessions says how, and with which code. Each record made by this run says ``jobs`` (the
    run's) and ``threads`` (the child's torch threads, as it reported them). An interruption (Ctrl-C, or SIGTERM:
    ``kill PID`` of a run started in the background) kills the running children; a reconstruction cell among them
    keeps its progress up to its last reconstructed unit (``<out dir>/.state/<out name>/<key>.state``, see
    :func:`run_cell`) and the next run goes on from there; any other cell is run again from its start.
    """
    t0 = time.perf_counter()
    jobs = check_int("jobs", jobs, 1)
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, (int, float))
                                   or not stop_after > 0):
        raise ValueError(f"stop_after={stop_after!r} must be a number of minutes > 0, or None")
    name, cells = select_cells(name_or_cells, only, exclude, model=model)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ValueError(f"out_path={str(out_path)!r}: directory {str(out_path.parent)!r} does not exist")
    reusable = _reusable(reuse)
    state_dir = out_path.parent / ".state" / out_path.stem  # the reconstruction cells' progress (run_cell)
    machine = machine_info()
    data = load_results(out_path)
    on = {"model": model} if model != "yolo" else {}  # a file of yolo cells stays as it was before models existed
    if data is None:
        data = {"suite": name, **on, "machine": machine, "runs": [], "cells": {}}
    elif data["suite"] != name:
        raise ValueError(f"out_path={str(out_path)!r} holds suite {data['suite']!r}, not {name!r}; choose another out")
    elif data.get("model", "yolo") != model:
        raise ValueError(f"out_path={str(out_path)!r} holds suite {name!r} on model {data.get('model', 'yolo')!r}, "
                         f"not {model!r}; choose another out")
    all_keys = [c.key for c in suite_cells(name_or_cells, model)[1]]
    done = [c for c in cells if is_done(data["cells"].get(c.key))]
    todo = [c for c in cells if not is_done(data["cells"].get(c.key))]
    run = SuiteRun(results=data, out_path=out_path, skipped=[c.key for c in done])
    if command is None:
        filters = "".join(f", {a}={v!r}" for a, v in (("only", only), ("exclude", exclude)) if v is not None)
        filters += f", jobs={jobs}" if jobs != 1 else ""
        command = f"python: run_suite({name!r}{filters})"
    entry = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "code": code_version(), "jobs": jobs, "seconds": 0.0, "ran": 0, "reused": 0, "failed": 0}
    runs = list(data.get("runs") or [])
    threads = None if jobs == 1 else max(1, torch.get_num_threads() // jobs)
    bar = tqdm(total=len(todo), desc=f"benchmark {name}", unit="cell", disable=not progress)

    def finish(cell: Cell, rec: dict) -> None:
        """Record a finished (or copied) cell and rewrite the file and its markdown."""
        nonlocal data
        if cell.key in reusable:
            run.reused.append(cell.key)
        else:
            rec["jobs"] = jobs
            if data.get("machine") != machine:
                rec["machine"] = machine  # resumed on another machine: say so on the cells measured here
            (run.ran if rec["status"] == "ok" else run.failed).append(cell.key)
        cells_now = dict(data["cells"])
        cells_now[cell.key] = rec
        entry.update(seconds=round(time.perf_counter() - t0, 1), ran=len(run.ran), reused=len(run.reused),
                     failed=len(run.failed))
        data = {"suite": name, **on, "machine": data.get("machine", machine), "runs": [*runs, dict(entry)],
                "cells": ordered_cells(cells_now, all_keys)}
        atomic_write_json(out_path, data)
        atomic_write_text(out_path.with_suffix(".md"), to_markdown(data))  # a stopped run leaves both in step
        run.results = data
        bar.update(1)

    queue = list(todo)
    running: dict = {}  # future -> its cell, in the order they started
    children = _Children()
    restore = _sigterm_as_interrupt()
    try:
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="benchmark-cell") as pool:
            try:
                while queue or running:
                    if queue and stop_after is not None and time.perf_counter() - t0 > 60 * stop_after:
                        run.not_started = [c.key for c in queue]
                        queue.clear()
                    while queue and len(running) < jobs:
                        cell = queue.pop(0)
                        if cell.key in reusable:
                            finish(cell, reusable[cell.key])
                            continue
                        running[pool.submit(run_cell, cell, device=device, threads=threads,
                                            children=children, state_dir=state_dir)] = cell
                        bar.set_postfix_str(", ".join(c.key for c in running.values()))
                    if not running:
                        continue
                    # a timeout, so that a Ctrl-C reaches this thread within a second whichever thread took it
                    finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in [f for f in running if f in finished]:  # in the order they started
                        finish(running.pop(fut), fut.result())
                    if finished and running:
                        bar.set_postfix_str(", ".join(c.key for c in running.values()))
            except BaseException:
                children.kill_all()  # the workers' os.wait4 then return; the pool's exit waits for them
                raise
    finally:
        restore()
        bar.close()
        _remove_empty(state_dir)  # no cell left progress to resume: no empty folder left behind
    order = {c.key: i for i, c in enumerate(cells)}
    for keys in (run.ran, run.failed, run.reused):
        keys.sort(key=order.__getitem__)  # the suite's order, not the order the cells finished in
    if out_path.exists() and not todo:
        atomic_write_text(out_path.with_suffix(".md"), to_markdown(data))
    run.seconds = time.perf_counter() - t0
    return run


def ordered_cells(cells: dict, order: list[str]) -> dict:
    """A result file's ``cells`` (key -> record) in the suite's ``order`` (its keys), as :func:`run_suite` writes them.

    The suite's cells come first, in its order; a cell renamed after it was run (its record's ``renamed_from``, e.g.
    by ``tools/migrate_results.py`` when a method was renamed) sits right after the place of the key it was made
    under, so that a rename moves no cell in the file; any others (kept from earlier runs, e.g. of an earlier
    budget) follow, sorted by key.
    """
    pos = {k: i for i, k in enumerate(order)}

    def rank(k: str) -> tuple:
        if k in pos:
            return 0, pos[k], 0, ""
        old = cells[k].get("renamed_from") if isinstance(cells[k], dict) else None
        if old in pos:
            return 0, pos[old], 1, k
        return 1, 0, 0, k

    return {k: cells[k] for k in sorted(cells, key=rank)}


