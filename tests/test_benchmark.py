import json
import math
import subprocess
import sys
import time

import pytest

from detptq_mini import benchmark
from detptq_mini.benchmark import SUITES, Cell, cell_args, load_results, run_suite, summarize, to_markdown
from detptq_mini.cli import main
from detptq_mini.lp import P_DEFAULT


def _bench(*args, cwd=None):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "detptq_mini.cli", "benchmark", *args], capture_output=True, text=True,
                       timeout=600, cwd=cwd)
    return r, time.perf_counter() - t0


# --- cells and suites (no subprocess) ---------------------------------------------------------------------------

def test_cell_key_and_args():
    c = Cell("lp", 4, 4, 0, p=2.5)
    assert c.key == "lp-p2.5-W4A4-s0-c64-v500"
    assert Cell("lp", 4, 8, 1, p=2).key == "lp-p2-W4A8-s1-c64-v500"  # p printed as given, int or float
    assert Cell("minmax", 4, 8, 2, calib=8, val=50).key == "minmax-W4A8-s2-c8-v50"
    assert Cell("brecq", 4, 4, iters=200, extra=["--no-8bit-stem"]).key == "brecq-W4A4-s0-c64-v500-i200+no-8bit-stem"
    assert cell_args(c) == ["quantize", "--method", "lp", "--w-bits", "4", "--a-bits", "4", "--seed", "0",
                            "--calib", "64", "--val", "500", "--p", "2.5", "--device", "cpu", "--json"]
    assert "--iters" not in cell_args(Cell("minmax", 4, 4))
    with pytest.raises(ValueError, match="w_bits"):
        Cell("lp", "4", 4)
    with pytest.raises(ValueError, match="method"):
        Cell("", 4, 4)


def test_suites():
    simple = SUITES["simple"]
    assert len(simple) == 60 and len({c.key for c in simple}) == 60
    assert {c.method for c in simple} == {"minmax", "lp", "detptq"}
    assert {c.p for c in simple if c.method == "lp"} == set(P_DEFAULT)
    assert {(c.w_bits, c.a_bits) for c in simple} == {(4, 4), (4, 8)}
    assert {c.seed for c in simple} == {0, 1, 2}
    assert all(c.calib == 64 and c.val == 500 for c in simple)
    quick = SUITES["quick"]
    assert 1 <= len(quick) <= 3 and all(c.val <= 50 and c.calib <= 8 for c in quick)


# --- summaries on hand-made results ----------------------------------------------------------------------------

def _rec(method, seed, m, p=None, calib=64, status="ok", wall=10.0):
    cell = Cell(method, 4, 4, seed, p=p, calib=calib)
    rec = {"key": cell.key, "cell": {**cell.__dict__, "extra": []}, "status": status, "wall_seconds": wall}
    if status == "ok":
        rec.update(map=m, map50=m + 0.1, ratio_to_fp=m / 0.9)
    else:
        rec["error"] = "detptq-mini: error: boom"
    return rec


def test_summarize_and_markdown():
    recs = [_rec("lp", 0, 0.5, p=2.0, wall=10), _rec("lp", 1, 0.6, p=2.0, wall=20), _rec("lp", 2, 0.7, p=2.0, wall=30),
            _rec("lp", 3, 0.0, p=2.0, status="failed"),
            _rec("minmax", 0, 0.4), _rec("minmax", 0, 0.3, calib=8)]
    results = {"suite": "custom", "machine": {"platform": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2},
               "cells": {r["key"]: r for r in recs}}
    rows = summarize(results)
    assert rows == summarize(results["cells"])  # the file or its cells
    assert [(r["method"], r["p"], r["calib"]) for r in rows] == [("lp", 2.0, 64), ("minmax", None, 64),
                                                                  ("minmax", None, 8)]
    lp = rows[0]
    assert lp["seeds"] == [0, 1, 2] and lp["n"] == 3  # the failed seed 3 is left out
    assert math.isclose(lp["map_mean"], 0.6) and math.isclose(lp["map_std"], 0.1)  # sample std (n - 1)
    assert math.isclose(lp["map50_mean"], 0.7) and math.isclose(lp["ratio_to_fp_mean"], 0.6 / 0.9)
    assert math.isclose(lp["wall_seconds_mean"], 20.0)
    assert rows[1]["map_std"] is None and rows[1]["n"] == 1
    md = to_markdown(results)
    lines = md.splitlines()
    assert "| method | bits | mAP50:95 mean ± std | mAP50 mean | % of FP | seeds | mean wall s |" in lines
    assert "| lp (p=2) | W4A4 | 0.6000 ± 0.1000 | 0.7000 | 66.67 | 3 | 20.0 |" in lines
    assert "| minmax | W4A4 | 0.4000 ± n/a | 0.5000 | 44.44 | 1 | 10.0 |" in lines
    assert "| minmax (calib 8) | W4A4 | 0.3000 ± n/a | 0.4000 | 33.33 | 1 | 10.0 |" in lines
    assert "- `lp-p2-W4A4-s3-c64-v500`: detptq-mini: error: boom" in lines


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, word", [
    (["--suite", "nosuch"], "allowed: simple, quick"),
    (["--suite", "quick", "--only", "nosuch"], "matches no cell"),
    (["--suite", "quick", "--out", "/nonexistent/dir/q.json"], "does not exist"),
    (["--suite", "quick", "--device", "tpu9"], "device"),
])
def test_bad_input_is_one_line_and_exit_2(args, word, capsys):
    assert main(["benchmark", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]


def test_out_of_another_suite_or_not_json_is_refused(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"suite": "simple", "machine": {}, "cells": {}}))
    with pytest.raises(ValueError, match="holds suite 'simple', not 'quick'"):
        run_suite("quick", other)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON file"):
        run_suite("quick", bad)


def test_list_shows_cells_and_status(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["benchmark", "--suite", "quick", "--out", str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{c.key}\ttodo" for c in SUITES["quick"]]
    assert not out.exists()


# --- failed cells (fast: the child stops on its bad option) -------------------------------------------------------

BAD = [Cell("minmax", 9, 8, calib=8, val=50), Cell("nosuch", 4, 4, calib=8, val=50)]


def test_failed_cells_are_recorded_not_done_and_the_run_goes_on(tmp_path):
    out = tmp_path / "bad.json"
    run = run_suite(BAD, out)
    assert run.failed == [c.key for c in BAD] and run.ran == [] and not run.ok  # went on after the first failure
    data = load_results(out)
    assert data["suite"] == "custom" and list(data["cells"]) == [c.key for c in BAD]
    r9 = data["cells"][BAD[0].key]
    assert r9["status"] == "failed" and r9["returncode"] == 2 and "w_bits=9" in r9["error"]
    assert r9["error"].startswith("detptq-mini: error:") and "\n" not in r9["error"]
    assert "is not a method" in data["cells"][BAD[1].key]["error"]
    assert "Failed cells" in (tmp_path / "bad.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "bad.md"]  # no temp files left


def test_cli_exit_status_is_nonzero_on_failure_and_failed_cells_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.SUITES, "quick", BAD[:1])
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["benchmark", "--suite", "quick"]) == 1
        cap = capsys.readouterr()
        assert "benchmark quick: 0 run, 0 skipped, 1 failed" in cap.out  # retried, never skipped
        assert "w_bits=9" in cap.err
    out = tmp_path / "benchmarks" / "results" / "quick.json"  # the default out, its directory created
    assert load_results(out)["cells"][BAD[0].key]["status"] == "failed"


# --- the quick suite end to end, then resumed ---------------------------------------------------------------------

def test_quick_suite_end_to_end_then_resume(tmp_path):
    out = tmp_path / "quick.json"
    r, first = _bench("--suite", "quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert first < 180, f"the quick suite took {first:.0f} s"
    n = len(SUITES["quick"])
    assert r.stdout.strip().splitlines()[-1].startswith(f"benchmark quick: {n} run, 0 skipped, 0 failed")
    assert r.stderr == ""  # no progress bar unless asked
    data = json.loads(out.read_text())
    assert data["suite"] == "quick"
    assert {"platform", "cpu_count", "torch", "torch_threads"} <= set(data["machine"])
    assert list(data["cells"]) == [c.key for c in SUITES["quick"]]
    for cell in SUITES["quick"]:
        rec = data["cells"][cell.key]
        assert rec["status"] == "ok" and rec["returncode"] == 0 and rec["key"] == cell.key
        assert Cell(**{**rec["cell"], "extra": tuple(rec["cell"]["extra"])}) == cell
        assert 0.0 <= rec["map"] <= 1.0 and 0.0 <= rec["map50"] <= 1.0 and rec["fp_map"] > 0
        assert rec["wall_seconds"] > 0 and rec["peak_rss_mb"] > 50
        assert rec["method"] == cell.method and rec["calib_images"] == cell.calib and "config" in rec
    md = (tmp_path / "quick.md").read_text()
    assert md.count("| W4A8 |") == len(SUITES["quick"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick.json", "quick.md"]  # no temp files left

    before = out.read_bytes()
    r, second = _bench("--suite", "quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"0 run, {len(SUITES['quick'])} skipped, 0 failed" in r.stdout
    assert second < 30 and out.read_bytes() == before and (tmp_path / "quick.md").read_text() == md
    r, _ = _bench("--suite", "quick", "--out", str(out), "--list")
    assert r.stdout.splitlines() == [f"{c.key}\tok" for c in SUITES["quick"]]
    print(f"quick suite: {first:.1f} s, resumed: {second:.1f} s")
