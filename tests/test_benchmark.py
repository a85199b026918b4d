import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detptq_mini import benchmark
from detptq_mini.benchmark import (RECON_ITERS, RECON_LR, SUITES, Cell, cell_args, load_results, machine_info, run_suite,
                                   summarize, to_markdown, unit_losses)
from detptq_mini.benchmark.suites import BRECQ_LR_ACT, LONG_ITERS, TWO_COIN
from detptq_mini.cli import main
from detptq_mini.lp import P_DEFAULT
from detptq_mini.pipeline import FIXED_P_METHODS, METHODS, RECON_METHODS


ROOT = Path(__file__).resolve().parent.parent


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
    r = Cell("qdrop", 4, 4, 1, iters=1000, lr_v=0.01, lr_act=1e-3)
    assert r.key == "qdrop-W4A4-s1-c64-v500-i1000-lrv0.01-lra0.001"
    assert cell_args(r)[-9:] == ["--iters", "1000", "--lr-v", "0.01", "--lr-act", "0.001", "--device", "cpu", "--json"]
    assert r.lr_v == 0.01 and isinstance(Cell("qdrop", 4, 4, lr_v=1).lr_v, float)
    for bad in (float("nan"), "0.01", True):
        with pytest.raises(ValueError, match="lr_act"):
            Cell("qdrop", 4, 4, lr_act=bad)
    with pytest.raises(ValueError, match="w_bits"):
        Cell("lp", "4", 4)
    with pytest.raises(ValueError, match="method"):
        Cell("", 4, 4)


def test_suites():
    simple = SUITES["simple"]
    assert len(simple) == 66 and len({c.key for c in simple}) == 66
    assert {c.method for c in simple} == {"minmax", "lp", "detptq"}
    rest_q = [c for c in simple if c.extra]
    assert len(rest_q) == 6 and all(c.method == "detptq" and c.extra == ("--rest", "quantized") for c in rest_q)
    assert {c.p for c in simple if c.method == "lp"} == set(P_DEFAULT)
    assert {(c.w_bits, c.a_bits) for c in simple} == {(4, 4), (4, 8)}
    assert {c.seed for c in simple} == {0, 1, 2}
    assert all(c.calib == 64 and c.val == 500 for c in simple)
    for name, cells in SUITES.items():
        assert len({c.key for c in cells}) == len(cells), name  # keys unique in every suite


def test_full_suite_has_exactly_the_comparisons_cells():
    full = SUITES["full"]
    bits = [(8, 8), (4, 8), (4, 4), (3, 3)]
    two = ("--qdrop-input", "two-coin")
    # best fixed p is no cell: the Lp rows of every p in P_DEFAULT; p = 2.4 is a cell of its own
    simple = [("minmax", None), *(("lp", p) for p in P_DEFAULT), ("lp", 2.4), ("detptq", None)]
    expected = {(m, p, w, a, s, None, ()) for m, p in simple for w, a in bits for s in (0, 1, 2)}
    rows = [("brecq", ()), ("joint", ()), ("qdrop", ()), ("qdrop", two), ("detptq-qdrop", ()), ("detptq-qdrop", two)]
    expected |= {(m, None, w, a, s, RECON_ITERS[f"W{w}A{a}"], e) for m, e in rows
                 for w, a in bits if (w, a) != (8, 8) for s in (0, 1, 2)}  # reconstruction only below 8 bits
    got = [(c.method, c.p, c.w_bits, c.a_bits, c.seed, c.iters, c.extra) for c in full]
    # one budget for every reconstruction cell: the same steps and rates in a row (BRECQ's second stage: its own)
    assert {(c.lr_v, c.lr_act) for c in full if c.iters is not None and c.method != "brecq"} == {RECON_LR}
    assert {(c.lr_v, c.lr_act) for c in full if c.method == "brecq"} == {(RECON_LR[0], BRECQ_LR_ACT)}
    assert all(c.lr_v is None and c.lr_act is None for c in full if c.iters is None)
    assert len(got) == len(expected) == 4 * 11 * 3 + 6 * 3 * 3 == 186 and set(got) == expected
    assert len({c.key for c in full}) == 186
    assert all(c.calib == 256 and c.val == 500 for c in full)  # one calibration count for all
    assert set(RECON_ITERS) == {"W4A8", "W4A4", "W3A3"}
    # a partial run is useful: every simple cell first, then the reconstruction cells seed by seed
    recon = [i for i, c in enumerate(full) if c.iters is not None]
    assert recon == list(range(len(full) - 54, len(full)))
    assert [full[i].seed for i in recon] == sorted(full[i].seed for i in recon)
    # the committed cells of the earlier code are suite cells under their corrected names; the suite is complete
    data = json.loads((ROOT / "benchmarks" / "results" / "full.json").read_text())
    new = {c.key for c in full if c.iters and c.method != "joint" and two[1] not in c.extra}  # the corrected methods
    assert len(new) == 27 and all(data["cells"].get(c.key, {}).get("status") == "ok" for c in full)
    # and each corrected cell says which scheme made it: BRECQ's two stages, QDrop's one coin
    for key in new:
        config = data["cells"][key]["config"]
        if key.startswith("brecq-"):
            assert config["stages"] == 2 and config["act_iters"] == RECON_ITERS["W4A4"] // 4, key
        else:
            assert config["qdrop_input"] == "one-coin" and config["quant_prob"] == 0.5, key


def test_recon_suite_orders_the_experiments_by_what_they_decide():
    recon, full_keys = SUITES["recon"], {c.key for c in SUITES["full"]}
    assert len(recon) == 62 and all(c.bits == "W4A4" and c.calib == 256 and c.val == 500 for c in recon)
    first = recon[:22]  # seed 0 of E1, E2, E9, E8, E3, E4, then E10's two long cells
    assert {c.seed for c in first} == {0} and [c.iters for c in first[-2:]] == [LONG_ITERS, LONG_ITERS]
    assert [c.seed for c in recon[22:]] == sorted(c.seed for c in recon[22:])
    e1 = [c for c in recon if not c.extra or c.extra == TWO_COIN]
    e1 = [c for c in e1 if c.iters == RECON_ITERS["W4A4"] and c.lr_act != 0]
    assert len(e1) == 18 and {c.key for c in e1} <= full_keys  # the same cells as full's W4A4 rows
    assert sum("head-fp" in c.extra for c in recon) == 15 and sum(c.lr_act == 0 for c in recon) == 9
    assert {c.extra for c in recon if c.method == "qdrop" and "--quant-prob" in c.extra} == {
        ("--quant-prob", "0.75"), ("--quant-prob", "0.9")}


def test_paper_suite_holds_the_rows_of_the_papers_table_w4a4_first():
    from detptq_mini.benchmark.suites import PAPER_CALIB
    from detptq_mini.lp import P_DEFAULT

    paper, ours = SUITES["paper"], SUITES["paper-recon"]
    assert len(paper) == 84 and len({c.key for c in paper + ours}) == 87
    assert all(c.calib == PAPER_CALIB and c.val == 500 for c in paper + ours)
    # seed 0 at W4A4 (11 cells), seed 0's other cells (9), seeds 1-2 (40), recon head-fp (3), the W4A8 p sweep (21)
    s0_w4a4, s0_rest, recon, sweep48 = paper[:11], paper[11:20], paper[60:63], paper[63:]
    simple = paper[:60]
    assert all(c.iters is None for c in simple + sweep48) and all(c.iters == RECON_ITERS["W4A4"] for c in recon + ours)
    assert [c.seed for c in simple] == sorted(c.seed for c in simple)  # seed 0's table first
    assert all(c.bits == "W4A4" and c.seed == 0 and not c.extra for c in s0_w4a4)
    assert {c.p for c in s0_w4a4 if c.method == "lp"} == set(P_DEFAULT) | {2.4}  # the oracle's p
    assert [c.method for c in s0_w4a4 if c.method != "lp"] == ["minmax", "detptq"]
    s0 = s0_w4a4 + s0_rest
    for bits in ("W8A8", "W4A8", "W4A4"):  # min-max, Lp p = 2 and 2.4, DetPTQ simple at each bits
        plain = {(c.method, c.p) for c in s0 if c.bits == bits and not c.extra}
        assert {("minmax", None), ("lp", 2.0), ("lp", 2.4), ("detptq", None)} <= plain
    assert [c.method for c in s0 if c.extra] == ["detptq"] and s0[-1].extra == ("--protocol", "head-fp")
    assert [(c.method, c.extra) for c in ours + recon] == [(m, e) for e in ((), ("--protocol", "head-fp"))
                                                           for m in ("brecq", "qdrop", "detptq-qdrop")]
    assert {c.seed for c in recon + ours} == {0} and all(c.bits == "W4A4" for c in recon + ours)
    # with the W4A8 sweep every p of P is there at W4A8 on every seed: the oracle at both bit widths below 8
    for s in (0, 1, 2):
        w4a8 = {c.p for c in paper if c.method == "lp" and c.bits == "W4A8" and c.seed == s}
        assert w4a8 == set(P_DEFAULT) | {2.4}
    assert all(c.method == "lp" and c.bits == "W4A8" and c.p != 2.0 for c in sweep48)
    from detptq_mini.benchmark.suites import on_model

    r18 = on_model(paper, "retinanet-r18")
    assert all(c.key.startswith("retinanet-r18-") for c in r18)


def test_ablation_suite():
    abl, full_keys = SUITES["ablations"], {c.key for c in SUITES["full"]}
    assert all(c.calib == 256 and c.val == 500 and c.seed in (0, 1, 2) for c in abl)
    variants = {(c.method, c.bits, c.extra, c.iters) for c in abl}
    odol = {(c.bits, c.extra) for c in abl if c.method == "detptq" and "--odol-cls" in c.extra}
    assert odol == {(b, ("--odol-cls", cls, "--odol-loc", loc)) for b in ("W4A4", "W4A8")
                    for cls, loc in (("kl", "iou"), ("l2", "l1"), ("l2", "iou"))}  # KL+L1 is the plain cell
    off = ("--no-8bit-stem", "--no-8bit-pred")
    two = ("--qdrop-input", "two-coin")
    it = RECON_ITERS["W4A4"]
    assert {("detptq", "W4A4", (), None), ("detptq", "W4A8", (), None), ("detptq", "W4A4", off, None),
            ("detptq", "W4A4", off[:1], None), ("detptq", "W4A4", off[1:], None), ("joint", "W4A4", (), it),
            ("qdrop", "W4A4", two, it), ("detptq-qdrop", "W4A4", two, it), ("detptq-qdrop", "W4A4", off + two, it),
            ("detptq-qdrop", "W4A4", ("--quant-prob", "1"), it), ("detptq", "W3A3", ("--rest", "quantized"), None)
            } <= variants
    assert len(variants) == 17 and len(abl) == 51 and all(
        sum((c.method, c.bits, c.extra, c.iters) == v for c in abl) == 3 for v in variants)  # 3 seeds each
    shared = {c.key for c in abl} & full_keys  # the cells --reuse can copy from the full suite's file
    assert shared == {c.key for c in abl if not c.extra or c.extra == two}
    assert len(shared) == 4 * 3 + 3  # detptq W4A4, W4A8; joint, qdrop, detptq-qdrop (two coins) at W4A4


def test_loss_norm_suite_pairs_each_reconstruction_setting_with_and_without_the_normalised_loss():
    cells = SUITES["loss-norm"]
    norm = ("--loss-norm", "before")
    two = ("--qdrop-input", "two-coin")

    def without(extra, part):
        return tuple(a for a in extra if a not in part)

    normed = [c for c in cells if "--loss-norm" in c.extra]
    plain = [c for c in cells if "--loss-norm" not in c.extra]
    assert len(cells) == 24 and len(plain) == len(normed) == 12
    assert all(c.bits == "W4A4" and c.calib == 256 and c.val == 500 and c.iters == RECON_ITERS["W4A4"]
               and (c.lr_v, c.lr_act) == RECON_LR for c in cells)
    # each normalised cell is a plain cell plus --loss-norm before, and the plain ones are cells of full/ablations
    assert sorted((c.method, c.seed, c.extra) for c in plain) == sorted((c.method, c.seed, without(c.extra, norm))
                                                                       for c in normed)
    assert {c.key for c in plain} <= {c.key for c in SUITES["full"]} | {c.key for c in SUITES["ablations"]}
    assert {(c.method, c.extra) for c in plain} == {("joint", ()), ("qdrop", two), ("detptq-qdrop", two),
                                                    ("detptq-qdrop", ("--quant-prob", "1"))}
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # seed by seed: a partial run is a table


def test_quick_suite_exercises_every_method_on_a_tiny_slice():
    quick = SUITES["quick"]
    assert {c.method for c in quick} == set(METHODS)
    assert all(c.val <= 50 and c.calib <= 8 for c in quick)
    assert all(c.iters is not None and c.iters <= 5 for c in quick if c.method in RECON_METHODS)
    assert any("--odol-cls" in c.extra for c in quick) and any("--no-8bit-stem" in c.extra for c in quick)


def test_quantize_odol_options_match_the_library_and_are_validated(capsys):
    from typing import get_args

    from detptq_mini import cli
    from detptq_mini.odol import ClsMode, LocMode

    assert cli._ODOL_CLS == get_args(ClsMode) and cli._ODOL_LOC == get_args(LocMode)
    from detptq_mini.reconstruction import LOSS_NORMS
    assert cli._LOSS_NORMS == LOSS_NORMS
    for args, word in [(["--method", "minmax", "--odol-cls", "l2"], "--odol-cls is only for --method detptq"),
                       (["--method", "lp", "--odol-loc", "iou"], "--odol-loc is only for --method detptq"),
                       (["--method", "detptq", "--odol-cls", "kl2"], "--odol-cls: invalid choice: 'kl2'")]:
        assert main(["quantize", "--w-bits", "4", "--a-bits", "4", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err


def test_code_version_is_the_checkouts_commit():
    import pathlib

    root = pathlib.Path(benchmark.__file__).resolve().parents[2]  # detptq_mini/benchmark/__init__.py -> the checkout
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    v = benchmark.code_version()
    assert v.split("+")[0] == head.stdout.strip() and v in (head.stdout.strip(), head.stdout.strip() + "+dirty")


def test_machine_info_describes_the_machine():
    m = machine_info()
    assert {"platform", "processor", "cpu_count", "memory_gb", "python", "torch", "torch_threads"} <= set(m)
    assert m["cpu_count"] >= 1 and m["torch_threads"] >= 1 and m["processor"]
    # the vector units, which change a cell's last digits: known flag names only, and torch's own reading
    from detptq_mini.benchmark.runner import ISA_FLAGS
    assert set(m["isa"]) <= set(ISA_FLAGS) and m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if "avx512f" in m["isa"]:
        assert "avx2" in m["isa"]


# --- summaries on hand-made results ----------------------------------------------------------------------------

def _rec(method, seed, m, p=None, calib=64, status="ok", wall=10.0, bits=(4, 4), iters=None, extra=(), peak=1000.0,
         lr=(None, None)):
    cell = Cell(method, *bits, seed, p=p, calib=calib, iters=iters, lr_v=lr[0], lr_act=lr[1], extra=extra)
    rec = {"key": cell.key, "cell": {**cell.__dict__, "extra": list(extra)}, "status": status, "wall_seconds": wall,
           "cpu_seconds": 2 * wall, "peak_rss_mb": peak}
    if status == "ok":
        rec.update(map=m, map50=m + 0.1, fp_map=0.9, fp_map50=0.99, ratio_to_fp=m / 0.9)
    else:
        rec["error"] = "detptq-mini: error: boom"
    return rec


MACHINE = {"platform": "x", "processor": "cpu9", "cpu_count": 2, "memory_gb": 8.0, "python": "3.11", "torch": "t",
           "torch_threads": 1}


def test_summarize_and_markdown():
    recs = [_rec("minmax", 0, 0.4),
            _rec("lp", 0, 0.5, p=2.0, wall=10, peak=900), _rec("lp", 1, 0.6, p=2.0, wall=20, peak=1100),
            _rec("lp", 2, 0.7, p=2.0, wall=30, peak=1000), _rec("lp", 3, 0.0, p=2.0, status="failed"),
            _rec("lp", 0, 0.65, p=3.0), _rec("lp", 1, 0.75, p=3.0),
            _rec("lp", 0, 0.8, p=2.0, bits=(4, 8)), _rec("lp", 0, 0.8, p=3.0, bits=(4, 8)),  # a tie: the smaller p
            _rec("lp", 0, 0.9, p=2.4), _rec("lp", 1, 0.9, p=2.4),  # not in P_DEFAULT: never the best fixed p
            _rec("minmax", 0, 0.3, calib=8),
            _rec("brecq", 0, 0.55, iters=100), _rec("brecq", 0, 0.6, iters=200), _rec("brecq", 0, 0.85, iters=100,
                                                                                       bits=(4, 8)),
            _rec("detptq", 0, 0.62), _rec("detptq", 0, 0.61, extra=("--odol-cls", "l2", "--odol-loc", "iou")),
            _rec("detptq", 0, 0.5, extra=("--no-8bit-stem", "--no-8bit-pred"))]
    runs = [{"command": "detptq-mini benchmark --suite x"}] * 2 + [
        {"command": "detptq-mini benchmark --suite x --only s1"}]
    results = {"suite": "custom", "machine": MACHINE, "runs": runs, "cells": {r["key"]: r for r in recs}}
    s = summarize(results)
    assert json.loads(json.dumps(s)) == s  # JSON-ready
    assert summarize(results["cells"])["rows"] == s["rows"]  # the file or its cells
    assert s["bits"] == ["W4A8", "W4A4"] and s["fp"] == [{"val": 500, "map": 0.9, "map50": 0.99}]
    assert s["progress"] == {"cells": len(recs), "ok": len(recs) - 1, "failed": 1, "todo": 0}
    assert s["failed"] == [{"key": "lp-p2-W4A4-s3-c64-v500", "error": "detptq-mini: error: boom"}]
    assert s["commands"] == [{"command": "detptq-mini benchmark --suite x", "runs": 2},
                             {"command": "detptq-mini benchmark --suite x --only s1", "runs": 1}]
    labels = [r["label"] for r in s["rows"]]  # calib varies between rows: every label says it
    assert labels == ["min-max (calib 64)", "min-max (calib 8)", "Lp p=2 (calib 64)", "Lp p=2.4 (calib 64)",
                      "Lp p=3 (calib 64)", "Lp, best fixed p (oracle) (calib 64)", "DetPTQ simple (calib 64)",
                      "DetPTQ simple (ODOL L2+IoU, calib 64)", "DetPTQ simple (8-bit stem/pred off, calib 64)",
                      "BRECQ (calib 64, iters 100)", "BRECQ (calib 64, iters 200)"]
    rows = dict(zip(labels, s["rows"]))
    lp = rows["Lp p=2 (calib 64)"]["cells"]["W4A4"]
    assert lp["seeds"] == [0, 1, 2] and lp["n"] == 3  # the failed seed 3 is left out
    assert math.isclose(lp["map_mean"], 0.6) and math.isclose(lp["map_std"], 0.1)  # sample std (n - 1)
    assert math.isclose(lp["map50_mean"], 0.7) and math.isclose(lp["map50_std"], 0.1)
    assert math.isclose(lp["ratio_to_fp_mean"], 0.6 / 0.9) and math.isclose(lp["wall_seconds_mean"], 20.0)
    assert math.isclose(lp["cpu_seconds_mean"], 40.0) and lp["peak_rss_mb_max"] == 1100
    assert lp["calib"] == 64 and lp["val"] == 500 and lp["iters"] is None
    best = rows["Lp, best fixed p (oracle) (calib 64)"]
    assert best["best_fixed_p"] and best["method"] == "lp" and set(best["cells"]) == {"W4A8", "W4A4"}
    assert best["cells"]["W4A4"]["p"] == 3.0 and math.isclose(best["cells"]["W4A4"]["map_mean"], 0.7)
    assert best["cells"]["W4A4"]["candidates"] == pytest.approx({"2": 0.6, "3": 0.7})
    assert best["cells"]["W4A8"]["p"] == 2.0  # equal means: the smaller p
    assert not best["cells"]["W4A4"]["complete"]  # 2 of the 8 p of P_DEFAULT: a partial sweep, no oracle yet
    assert set(rows["BRECQ (calib 64, iters 100)"]["cells"]) == {"W4A8", "W4A4"}
    assert set(rows["BRECQ (calib 64, iters 200)"]["cells"]) == {"W4A4"}
    assert rows["min-max (calib 64)"]["cells"]["W4A4"]["map_std"] is None

    lines = to_markdown(results).splitlines()
    assert lines[0] == "# Benchmark `custom`"
    assert lines.count("| method | W4A8 | W4A4 |") == 4  # mAP50:95, mAP50, % of FP, cost
    for line in ["| Lp p=2 (calib 64) | 0.8000 (1) | 0.6000 ± 0.1000 (3) |",  # mAP50:95
                 "| Lp, best fixed p (oracle) (calib 64) | 0.8000 (1), p=2 (partial: 2 of 8 p) "
                 "| 0.7000 ± 0.0707 (2), p=3 (partial: 2 of 8 p) |",
                 "| BRECQ (calib 64, iters 200) | — | 0.6000 (1) |",
                 "| Lp p=2 (calib 64) | 0.9000 (1) | 0.7000 ± 0.1000 (3) |",  # mAP50
                 "| Lp p=2 (calib 64) | 88.89 | 66.67 |",  # % of FP
                 "| Lp, best fixed p (oracle) (calib 64) | 88.89, p=2 (partial: 2 of 8 p) "
                 "| 77.78, p=3 (partial: 2 of 8 p) |",
                 "| Lp p=2 (calib 64) | 10.0 s, 1000 MB | 20.0 s, 1100 MB |",  # cost
                 "| Lp, best fixed p (oracle) (calib 64) | the Lp rows | the Lp rows |",
                 "| min-max (calib 8) | 8 | 500 | — |",  # settings
                 "| BRECQ (calib 64, iters 100) | 64 | 500 | iters 100 |",
                 "- `lp-p2-W4A4-s3-c64-v500`: detptq-mini: error: boom",
                 "FP reference (the shipped model): mAP50:95 0.9000, mAP50 0.9900 on 500 val images.",
                 "Machine: x, cpu9, 2 CPUs, 8 GB RAM; Python 3.11, torch t (1 threads)."]:
        assert line in lines, line
    assert any(ln.startswith("Best fixed p:") and "oracle" in ln for ln in lines)
    assert any(ln.startswith("Made by: `detptq-mini benchmark --suite x` (2 runs); `detptq-mini benchmark --suite x "
                             "--only s1`") for ln in lines)
    assert lines[2].startswith(f"Cells: {len(recs) - 1} of {len(recs)} done, 1 failed.")


def test_the_best_fixed_p_is_complete_only_with_every_p_of_the_sweep():
    recs = [_rec("lp", 0, 0.1 + p / 10, p=p) for p in P_DEFAULT]
    whole = summarize({r["key"]: r for r in recs})
    best = next(r for r in whole["rows"] if r["best_fixed_p"])["cells"]["W4A4"]
    assert best["complete"] and best["p"] == max(P_DEFAULT) and len(best["candidates"]) == len(P_DEFAULT)
    assert "partial" not in to_markdown({r["key"]: r for r in recs})
    part = summarize({r["key"]: r for r in recs[:-1]})
    best = next(r for r in part["rows"] if r["best_fixed_p"])["cells"]["W4A4"]
    assert not best["complete"] and best["p"] == P_DEFAULT[-2]
    assert f"p={P_DEFAULT[-2]:g} (partial: 7 of 8 p)" in to_markdown({r["key"]: r for r in recs[:-1]})


def test_a_model_whose_fp_map_is_zero_summarizes_without_a_percent_of_fp():
    """An untrained detector (FP mAP 0): its cells record ratio_to_fp None; the tables say so, the plots skip it."""
    import matplotlib

    matplotlib.use("Agg")
    from detptq_mini.viz import plot_ratio_vs_bits, summary_table

    recs = [_rec("minmax", 0, 0.0), _rec("minmax", 1, 0.0)]
    for rec in recs:
        rec.update(fp_map=0.0, ratio_to_fp=None)
    s = summarize({r["key"]: r for r in recs})
    cell = benchmark.cell_of(s, "min-max", "W4A4")
    assert cell["ratio_to_fp_mean"] is None and cell["map_mean"] == 0.0 and cell["n"] == 2
    assert "| min-max | — (FP mAP 0) |" in to_markdown({r["key"]: r for r in recs}).splitlines()
    assert "— (FP mAP 0) (2)" in str(summary_table(s, ["min-max"], pct=True))
    fig = plot_ratio_vs_bits(s)
    assert fig.axes[0].get_legend_handles_labels()[1] == []  # nothing to draw as % of FP
    matplotlib.pyplot.close(fig)


def test_a_head_fp_cell_has_its_own_key_and_its_own_labelled_row():
    head_fp = ("--protocol", "head-fp")
    cell = Cell("detptq", 4, 4, 0, extra=head_fp)
    assert cell.key == "detptq-W4A4-s0-c64-v500+protocol+head-fp" != Cell("detptq", 4, 4, 0).key
    assert cell_args(cell)[-5:] == ["--protocol", "head-fp", "--device", "cpu", "--json"]
    recs = [_rec("detptq", 0, 0.6), _rec("detptq", 1, 0.7), _rec("detptq", 0, 0.3, extra=head_fp),
            _rec("detptq", 1, 0.4, extra=head_fp), _rec("detptq", 0, 0.2, extra=head_fp + ("--no-8bit-stem",)),
            _rec("lp", 0, 0.5, p=2.0, extra=head_fp), _rec("lp", 0, 0.55, p=3.0, extra=head_fp),
            _rec("detptq", 0, 0.1, extra=("--protocol", "ours"))]  # explicit: its own row, labelled as given
    s = summarize({r["key"]: r for r in recs})
    rows = {row["label"]: row for row in s["rows"]}
    assert list(rows) == ["Lp p=2, head FP", "Lp p=3, head FP", "Lp, best fixed p (oracle), head FP",
                          "DetPTQ simple", "DetPTQ simple (protocol ours)", "DetPTQ simple, head FP",
                          "DetPTQ simple, head FP (8-bit stem off)"]  # a method's head-FP rows after its others
    assert rows["DetPTQ simple"]["cells"]["W4A4"]["map_mean"] == pytest.approx(0.65)  # not mixed with head FP
    assert rows["DetPTQ simple, head FP"]["cells"]["W4A4"]["map_mean"] == pytest.approx(0.35)
    assert rows["Lp, best fixed p (oracle), head FP"]["cells"]["W4A4"]["p"] == 3.0
    assert "| DetPTQ simple, head FP | 0.3500 ± 0.0707 (2) |" in to_markdown({r["key"]: r for r in recs})


def test_summary_states_the_learning_rates_of_a_budget():
    lr = (0.01, 0.001)
    one = {"suite": "custom", "cells": {r["key"]: r for r in [
        _rec("qdrop", 0, 0.5, iters=1000, lr=lr), _rec("qdrop", 1, 0.6, iters=1000, lr=lr),
        _rec("qdrop", 0, 0.7, iters=500, lr=lr, bits=(4, 8))]}}
    s = summarize(one)
    assert [r["label"] for r in s["rows"]] == ["QDrop"]  # one budget per bits: the budget is in the settings
    c = s["rows"][0]["cells"]["W4A4"]
    assert (c["n"], c["iters"], c["lr_v"], c["lr_act"]) == (2, 1000, 0.01, 0.001)
    assert "| QDrop | 64 | 500 | W4A8: iters 500, lr V 0.01, lr act 0.001; W4A4: iters 1000, lr V 0.01, lr act 0.001 |" \
        in to_markdown(one).splitlines()
    # the same steps at other rates in one bits column: two rows, each naming its rates
    two = {"suite": "custom", "cells": {r["key"]: r for r in [
        _rec("qdrop", 0, 0.5, iters=1000, lr=lr), _rec("qdrop", 0, 0.4, iters=1000)]}}
    rows = {r["label"]: r for r in summarize(two)["rows"]}
    assert set(rows) == {"QDrop (iters 1000, lr V 0.01, lr act 0.001)", "QDrop (iters 1000)"}
    assert rows["QDrop (iters 1000)"]["cells"]["W4A4"]["map_mean"] == 0.4
    # a record written before the learning rates were cell fields reads as the library's defaults
    old = _rec("qdrop", 0, 0.4, iters=1000)
    del old["cell"]["lr_v"], old["cell"]["lr_act"]
    assert summarize({"suite": "custom", "cells": {old["key"]: old}})["rows"][0]["cells"]["W4A4"]["lr_v"] is None


def test_summary_of_a_named_suite_counts_its_cells_and_leaves_out_others():
    quick = SUITES["quick"]
    first = _rec("minmax", 0, 0.4, calib=8, bits=(4, 8))
    first["key"] = quick[0].key
    first["cell"]["val"] = 50
    stale = _rec("brecq", 0, 0.5, iters=3)  # e.g. a cell of an earlier budget, kept in the file
    results = {"suite": "quick", "machine": MACHINE, "cells": {first["key"]: first, stale["key"]: stale}}
    s = summarize(results)
    assert s["progress"] == {"cells": len(quick), "ok": 1, "failed": 0, "todo": len(quick) - 1}
    assert s["excluded"] == [stale["key"]] and [r["label"] for r in s["rows"]] == ["min-max"]
    md = to_markdown(results)
    assert f"Cells: 1 of {len(quick)} done, {len(quick) - 1} to do." in md and stale["key"] in md


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, word", [
    (["--suite", "nosuch"], "allowed: simple, full, ablations, loss-norm, recon, paper, paper-recon, quick"),
    (["--quick", "--suite", "full"], "--quick is --suite quick; it cannot be combined with --suite full"),
    (["--suite", "ablations", "--reuse", "/nonexistent/full.json"], "--reuse '/nonexistent/full.json' does not exist"),
    (["--suite", "quick", "--only", "nosuch"], "--only 'nosuch' leaves no cell of suite 'quick'"),
    (["--suite", "quick", "--exclude", "c8"], "--exclude 'c8' leaves no cell of suite 'quick'"),
    (["--suite", "quick", "--only", "W4A8", "--exclude", "W4A8"], "--only 'W4A8' and --exclude 'W4A8' leaves no"),
    (["--suite", "quick", "--exclude="], "--exclude '' must be a non-empty substring"),
    (["--suite", "quick", "--out", "/nonexistent/dir/q.json"],
     "--out '/nonexistent/dir/q.json': directory '/nonexistent/dir' does not exist"),
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


def test_list_shows_cells_status_and_count(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["benchmark", "--quick", "--out", str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(SUITES["quick"])
    assert lines == [f"{c.key}\ttodo" for c in SUITES["quick"]] + [f"suite quick: {n} cells, 0 ok, 0 failed, {n} todo"]
    assert not out.exists()
    assert main(["benchmark", "--suite", "full", "--out", str(tmp_path / "full.json"), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"{c.key}\ttodo" for c in SUITES["full"]]
    assert lines[-1] == "suite full: 186 cells, 0 ok, 0 failed, 186 todo"
    assert main(["benchmark", "--suite", "full", "--out", str(tmp_path / "full.json"), "--only", "W3A3", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "suite full: 51 of 186 cells, 0 ok, 0 failed, 51 todo"
    # --exclude=-i: every cell but the reconstruction cells (their keys carry -i<iters>)
    assert main(["benchmark", "--suite", "full", "--out", str(tmp_path / "full.json"), "--exclude=-i", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"{c.key}\ttodo" for c in SUITES["full"] if c.iters is None]
    assert lines[-1] == "suite full: 132 of 186 cells, 0 ok, 0 failed, 132 todo"
    # --only and --exclude are repeatable: a cell that contains any --only and no --exclude
    assert main(["benchmark", "--suite", "full", "--out", str(tmp_path / "full.json"), "--only", "W3A3-s1",
                 "--only", "W8A8-s2", "--exclude=-i", "--exclude", "lp-", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = [c.key for c in SUITES["full"] if ("W3A3-s1" in c.key or "W8A8-s2" in c.key)
            and c.iters is None and c.method != "lp"]
    assert [ln.split("\t")[0] for ln in lines[:-1]] == want and len(want) == 4  # min-max and DetPTQ at each
    assert lines[-1] == "suite full: 4 of 186 cells, 0 ok, 0 failed, 4 todo"


def test_select_cells_takes_one_substring_or_a_list():
    from detptq_mini.benchmark import select_cells

    one = select_cells("full", "W4A4-s0")[1]
    two = select_cells("full", ["W4A4-s0", "W4A4-s1"])[1]
    assert [c.key for c in two] == [c.key for c in SUITES["full"] if "W4A4-s0" in c.key or "W4A4-s1" in c.key]
    assert set(c.key for c in one) < set(c.key for c in two)
    assert select_cells("full", ("W4A4-s0",))[1] == one  # a one-element list is the substring itself
    kept = select_cells("full", "W4A4-s0", ["-i", "lp-"])[1]
    assert [c.method for c in kept] == ["minmax", "detptq"]
    for bad in ([], [""], ["W4A4", 3], 3):
        with pytest.raises(ValueError, match="must be a non-empty substring of cell keys, a non-empty list"):
            select_cells("full", bad)
    with pytest.raises(ValueError, match="only=\\['nosuch', 'nothis'\\] leaves no cell of suite 'full'"):
        select_cells("full", ["nosuch", "nothis"])
    with pytest.raises(ValueError, match="--only 'nosuch' --only 'nothis' leaves no cell"):
        select_cells("full", ["nosuch", "nothis"], argument_names={"only": "--only"})


def test_bad_reuse_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["benchmark", "--quick", "--out", str(tmp_path / "q.json"), "--reuse", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reuse '" in err[0] and "is not a benchmark result file" in err[0]
    with pytest.raises(ValueError, match="reuse='/nonexistent/x.json' does not exist"):
        run_suite("quick", tmp_path / "q.json", reuse="/nonexistent/x.json")
    assert main(["benchmark", "--quick", "--out", str(bad), "--reuse", str(bad)]) == 2
    assert "is the --out file itself" in capsys.readouterr().err


def test_reuse_copies_done_cells_without_running_them(tmp_path, monkeypatch):
    cells = [Cell("minmax", 4, 8, 0, calib=8, val=50), Cell("nosuch", 4, 4, calib=8, val=50)]
    done = _rec("minmax", 0, 0.4, calib=8, bits=(4, 8))
    done["key"], done["cell"]["val"] = cells[0].key, 50
    other = {"suite": "full", "machine": {**MACHINE, "platform": "elsewhere"}, "cells": {cells[0].key: done}}
    src = tmp_path / "full.json"
    src.write_text(json.dumps(other))
    out = tmp_path / "mine.json"
    run = run_suite(cells, out, reuse=[src], command="my command")
    assert run.reused == [cells[0].key] and run.ran == [] and run.failed == [cells[1].key]  # the other one ran
    assert "0 run, 1 reused, 0 skipped, 1 failed" in run.summary()
    data = load_results(out)
    rec = data["cells"][cells[0].key]
    assert rec["reused_from"] == str(src) and rec["machine"]["platform"] == "elsewhere"
    assert {k: v for k, v in rec.items() if k not in ("reused_from", "machine")} == done  # the measurement itself
    assert [(r["command"], r["ran"], r["reused"], r["failed"]) for r in data["runs"]] == [("my command", 0, 1, 1)]
    assert data["runs"][0]["code"] == benchmark.code_version()  # the checkout's commit (None outside git)
    assert "1 cells were measured elsewhere" in (tmp_path / "mine.md").read_text()
    run = run_suite(cells, out, reuse=[src])  # the copy is done now: skipped, not copied again
    assert run.skipped == [cells[0].key] and run.reused == [] and len(load_results(out)["runs"]) == 2


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
    r, first = _bench("--quick", "--out", str(out), "--jobs", "2")  # two cells at a time, one thread each
    assert r.returncode == 0, r.stderr
    assert first < 900, f"the quick suite took {first:.0f} s"  # a hang guard, not a speed claim (benchmarks time it)
    quick = SUITES["quick"]
    n = len(quick)
    assert r.stdout.strip().splitlines()[-1].startswith(f"benchmark quick: {n} run, 0 skipped, 0 failed")
    assert r.stderr == ""  # no progress bar unless asked
    data = json.loads(out.read_text())
    assert data["suite"] == "quick" and list(data) == ["suite", "machine", "runs", "cells"]
    assert {"platform", "processor", "cpu_count", "memory_gb", "torch", "torch_threads"} <= set(data["machine"])
    assert [(r["command"], r["ran"], r["reused"], r["failed"]) for r in data["runs"]] == [
        (f"detptq-mini benchmark --suite quick --out {out} --jobs 2", n, 0, 0)]
    assert list(data["cells"]) == [c.key for c in quick]
    for cell in quick:
        rec = data["cells"][cell.key]
        assert rec["status"] == "ok" and rec["returncode"] == 0 and rec["key"] == cell.key
        assert Cell(**{**rec["cell"], "extra": tuple(rec["cell"]["extra"])}) == cell
        assert 0.0 <= rec["map"] <= 1.0 and 0.0 <= rec["map50"] <= 1.0 and rec["fp_map"] > 0
        assert rec["wall_seconds"] > 0 and rec["peak_rss_mb"] > 50
        assert len(rec["load_avg"]) == 3 and all(x >= 0 for x in rec["load_avg"])
        assert rec["jobs"] == 2 and rec["threads"] == max(1, torch.get_num_threads() // 2)  # as the child says
        assert rec["method"] == cell.method and rec["calib_images"] == cell.calib and rec["val_images"] == cell.val
        assert (rec["w_bits"], rec["a_bits"], rec["calib_seed"]) == (cell.w_bits, cell.a_bits, cell.seed)
        cfg, qc = rec["config"], rec["quant_config"]  # the cell's options reached run_ptq
        assert cfg["iters"] == cell.iters and cfg["p"] == (2.0 if cell.method in FIXED_P_METHODS else None)
        assert cfg["quant_prob"] == {"brecq": 1.0, "joint": 1.0, "qdrop": 0.5, "detptq-qdrop": 0.5}.get(cell.method)
        assert cfg["stages"] == {"brecq": 2, "joint": 1, "qdrop": 1, "detptq-qdrop": 1}.get(cell.method)
        assert (cfg["odol_cls"], cfg["odol_loc"]) == (("l2", "iou") if "--odol-cls" in cell.extra else ("kl", "l1"))
        assert qc["stem_8bit"] == ("--no-8bit-stem" not in cell.extra) == cfg["stem_8bit"]
        assert qc["pred_8bit"] == ("--no-8bit-pred" not in cell.extra)
        assert bool(rec["chosen_p"]) == (cell.method != "minmax")  # every method but min-max reports its p
    s = summarize(data)
    assert s["progress"] == {"cells": n, "ok": n, "failed": 0, "todo": 0} and not s["failed"] and not s["excluded"]
    assert s["bits"] == ["W4A8", "W4A4"] and {row["method"] for row in s["rows"]} == set(METHODS)
    assert sum(len(row["cells"]) for row in s["rows"]) == n  # one seed each: one row cell per cell
    md = (tmp_path / "quick.md").read_text()
    assert md == to_markdown(data) and md.count("| method | W4A8 | W4A4 |") == 4
    for row in s["rows"]:
        assert md.count(f"| {row['label']} |") == 5  # mAP50:95, mAP50, % of FP, cost, settings
    assert "Made by: `detptq-mini benchmark --suite quick --out" in md and "Machine: " in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick.json", "quick.md"]  # no temp files left

    before = out.read_bytes()
    r, second = _bench("--suite", "quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"0 run, {n} skipped, 0 failed" in r.stdout
    assert second < 120 and out.read_bytes() == before and (tmp_path / "quick.md").read_text() == md
    r, _ = _bench("--quick", "--out", str(out), "--list")
    assert r.stdout.splitlines() == [f"{c.key}\tok" for c in quick] + [
        f"suite quick: {n} cells, {n} ok, 0 failed, 0 todo"]
    print(f"quick suite: {first:.1f} s, resumed: {second:.1f} s")


def test_plot_ratio_vs_bits_draws_every_row_from_the_summary():
    import matplotlib

    matplotlib.use("Agg")
    from detptq_mini.viz import plot_ratio_vs_bits

    recs = [_rec("minmax", 0, 0.45, bits=(4, 8)), _rec("minmax", 0, 0.09), _rec("qdrop", 0, 0.54, iters=10),
            _rec("qdrop", 1, 0.63, iters=10), _rec("qdrop", 0, 0.81, iters=10, bits=(4, 8))]
    s = summarize({"suite": "custom", "cells": {r["key"]: r for r in recs}})
    fig = plot_ratio_vs_bits(s, ["min-max", "QDrop"], title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W4A8", "W4A4"] and ax.get_title() == "t"
    handles, labels = ax.get_legend_handles_labels()
    lines = dict(zip(labels, handles))
    assert set(lines) == {"min-max", "QDrop"}
    ys = lines["QDrop"][0].get_ydata()  # % of FP: the mean ratio over seeds
    assert ys == pytest.approx([100 * 0.81 / 0.9, 100 * (0.54 + 0.63) / 2 / 0.9])
    # the error bar is the std over seeds, in % of FP: (0.63 - 0.54) / sqrt(2) / 0.9
    seg = lines["QDrop"][2][0].get_segments()[1]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * 100 * 0.09 / 2 ** 0.5 / 0.9)
    assert [t.get_text() for t in ax.texts] == ["n=1"]  # QDrop has one seed at W4A8, two at W4A4
    assert len(plot_ratio_vs_bits(s).axes[0].get_legend_handles_labels()[1]) == 2  # default: every row
    with pytest.raises(ValueError, match="labels: \\['BRECQ'\\] are not rows of the summary"):
        plot_ratio_vs_bits(s, ["BRECQ"])


def test_the_logged_command_reruns_with_a_value_that_starts_with_a_dash(tmp_path, monkeypatch):
    import shlex

    seen = {}

    def fake_run_suite(suite, out, **kw):
        seen.update(kw, suite=suite)
        return benchmark.SuiteRun(results={"suite": suite, "cells": {}}, out_path=out)

    monkeypatch.setattr(benchmark, "run_suite", fake_run_suite)
    out = tmp_path / "f.json"
    assert main(["benchmark", "--suite", "full", "--out", str(out), "--exclude=-i", "--only", "W4A4"]) == 0
    assert seen["exclude"] == ["-i"] and seen["only"] == ["W4A4"]
    logged = shlex.split(seen["command"])
    assert logged == ["detptq-mini", "benchmark", "--suite", "full", "--out", str(out), "--only", "W4A4", "--exclude=-i"]
    assert main(logged[1:] + ["--list"]) == 0  # the logged command parses as it was given


# --- several cells at once (--jobs) -------------------------------------------------------------------------------

JOB_CELLS = [Cell("minmax", 4, 8, s, calib=8, val=50) for s in range(4)]


def _stub_run_cell(log, seconds=None, fail=()):
    """A stand-in for runner.run_cell: sleeps (the first cell longest, so that cells finish out of order), logs
    (key, start, end, threads, thread name) and returns a record of run_cell's shape."""
    import threading
    from dataclasses import asdict

    seconds = seconds or {c.key: 0.6 if i == 0 else 0.2 for i, c in enumerate(JOB_CELLS)}

    def run_cell(cell, device="cpu", threads=None, children=None, state_dir=None):
        t = time.perf_counter()
        time.sleep(seconds[cell.key])
        log.append((cell.key, t, time.perf_counter(), threads, threading.current_thread().name))
        ok = cell.key not in fail
        rec = {"key": cell.key, "cell": asdict(cell), "status": "ok" if ok else "failed", "returncode": 0 if ok else 2,
               "wall_seconds": 1.0, "cpu_seconds": 1.0, "peak_rss_mb": 100.0, "load_avg": [0.0, 0.0, 0.0],
               "threads": threads or 2}
        if ok:
            rec.update(map=0.5, map50=0.6, fp_map=0.9, fp_map50=0.99, ratio_to_fp=0.5 / 0.9)
        else:
            rec["error"] = "detptq-mini: error: boom"
        return rec

    return run_cell


def _most_at_once(log) -> int:
    events = sorted([(t0, 1) for _, t0, _, _, _ in log] + [(t1, -1) for _, _, t1, _, _ in log])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_jobs_runs_cells_at_once_and_writes_the_same_file_in_the_suites_order(tmp_path, monkeypatch, capsys):
    import threading

    import torch

    from detptq_mini.benchmark import runner

    writers = []
    real_write = runner.atomic_write_json
    monkeypatch.setattr(runner, "atomic_write_json",
                        lambda *a: (writers.append(threading.current_thread() is threading.main_thread()),
                                    real_write(*a)))
    files, logs = {}, {}
    for jobs in (1, 2):
        logs[jobs] = []
        monkeypatch.setattr(runner, "run_cell", _stub_run_cell(logs[jobs]))
        files[jobs] = tmp_path / f"j{jobs}.json"
        run = run_suite(JOB_CELLS, files[jobs], jobs=jobs, progress=True)
        assert run.ran == [c.key for c in JOB_CELLS] and run.ok  # the suite's order, not the finishing order
        assert f"{len(JOB_CELLS)}/{len(JOB_CELLS)}" in capsys.readouterr().err  # the progress bar reached the end
    assert _most_at_once(logs[1]) == 1 and _most_at_once(logs[2]) == 2
    assert [k for k, *_ in logs[2]][:2] == [JOB_CELLS[1].key, JOB_CELLS[2].key]  # finished before the first cell
    assert {t for *_, t, _ in logs[1]} == {None}  # one at a time: the child's threads untouched
    assert {t for *_, t, _ in logs[2]} == {max(1, torch.get_num_threads() // 2)}
    assert writers and all(writers)  # one writer: the main thread, after every cell
    one, two = (load_results(files[j]) for j in (1, 2))
    assert list(one) == list(two) == ["suite", "machine", "runs", "cells"]
    assert list(one["cells"]) == list(two["cells"]) == [c.key for c in JOB_CELLS]
    for key in one["cells"]:
        a, b = one["cells"][key], two["cells"][key]
        assert list(a) == list(b) and (a["jobs"], b["jobs"]) == (1, 2)
        assert {k: v for k, v in a.items() if k not in ("jobs", "threads")} == \
            {k: v for k, v in b.items() if k not in ("jobs", "threads")}
    assert [(r["jobs"], r["ran"]) for r in one["runs"]] == [(1, 4)] and two["runs"][0]["jobs"] == 2
    assert "jobs=2" in two["runs"][0]["command"] and "jobs" not in one["runs"][0]["command"]
    assert "4 cells ran beside other cells" in (tmp_path / "j2.md").read_text()
    assert "beside other cells" not in (tmp_path / "j1.md").read_text()

    # resumed: every cell done, nothing runs, the file is left as it is
    before = files[2].read_bytes()
    logs[3] = []
    monkeypatch.setattr(runner, "run_cell", _stub_run_cell(logs[3]))
    run = run_suite(JOB_CELLS, files[2], jobs=2)
    assert run.skipped == [c.key for c in JOB_CELLS] and not run.ran and not logs[3]
    assert files[2].read_bytes() == before


def test_jobs_records_a_failed_cell_and_the_next_run_retries_only_it(tmp_path, monkeypatch):
    from detptq_mini.benchmark import runner

    out = tmp_path / "f.json"
    log = []
    monkeypatch.setattr(runner, "run_cell", _stub_run_cell(log, fail={JOB_CELLS[1].key}))
    run = run_suite(JOB_CELLS, out, jobs=3)
    assert run.failed == [JOB_CELLS[1].key] and len(run.ran) == 3 and _most_at_once(log) <= 3
    assert load_results(out)["cells"][JOB_CELLS[1].key]["status"] == "failed"
    log.clear()
    monkeypatch.setattr(runner, "run_cell", _stub_run_cell(log))
    run = run_suite(JOB_CELLS, out, jobs=3)
    assert [k for k, *_ in log] == run.ran == [JOB_CELLS[1].key] and len(run.skipped) == 3
    assert list(load_results(out)["cells"]) == [c.key for c in JOB_CELLS]


def _minute_long_cells(pids: list):
    """A ``run_cell`` whose child sleeps a minute (its pid appended to ``pids``), and a function that waits until two
    such children run (not a fixed delay: a loaded machine may be slow)."""
    import os

    def run_cell(cell, device="cpu", threads=None, children=None, state_dir=None):
        proc = subprocess.Popen(["sleep", "60"])
        pids.append(proc.pid)
        children.add(proc.pid)
        try:
            os.wait4(proc.pid, 0)
        finally:
            children.discard(proc.pid)
        return _stub_run_cell([], seconds={cell.key: 0})(cell)

    def wait_for_both():
        deadline = time.perf_counter() + 60
        while len(pids) < 2 and time.perf_counter() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the main thread is back in its wait loop

    return run_cell, wait_for_both


def test_an_interrupted_run_with_jobs_kills_its_children(tmp_path, monkeypatch):
    import _thread
    import os
    import threading

    from detptq_mini.benchmark import runner

    pids = []
    run_cell, wait_for_both = _minute_long_cells(pids)
    monkeypatch.setattr(runner, "run_cell", run_cell)
    sent = []

    def ctrl_c():  # as a Ctrl-C once both children run
        wait_for_both()
        sent.append(time.perf_counter())
        _thread.interrupt_main()

    threading.Thread(target=ctrl_c, daemon=True).start()
    # as in a terminal: a job started with `&` by a non-interactive shell inherits SIGINT ignored, and then
    # interrupt_main does nothing (this test failed that way in a backgrounded dry run of .ci/run)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "i.json"
    try:
        with pytest.raises(KeyboardInterrupt):
            run_suite(JOB_CELLS, out, jobs=2)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    assert sent and time.perf_counter() - sent[0] < 10  # stopped soon after the Ctrl-C, not after the children's 60 s
    assert len(pids) == 2  # two children started, both killed and reaped
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not out.exists()  # the killed cells are not recorded


def test_a_sigterm_stops_a_run_as_ctrl_c_does_and_kills_its_children(tmp_path, monkeypatch):
    """`kill PID` of a benchmark run in the background (where SIGINT is ignored) must not orphan its cells."""
    import os
    import threading

    from detptq_mini.benchmark import runner

    pids = []
    run_cell, wait_for_both = _minute_long_cells(pids)
    monkeypatch.setattr(runner, "run_cell", run_cell)
    sent = []

    def terminate():
        wait_for_both()
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)

    def before(signum, frame):  # what the process had: without run_suite's own handler, this would get it
        raise AssertionError("run_suite did not handle SIGTERM")

    old_handler = signal.signal(signal.SIGTERM, before)
    threading.Thread(target=terminate, daemon=True).start()
    out = tmp_path / "t.json"
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            run_suite(JOB_CELLS, out, jobs=2)
        assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert sent and time.perf_counter() - sent[0] < 10
    assert len(pids) == 2
    for pid in pids:  # killed and reaped, not left running under init
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not out.exists()


def test_stop_after_starts_no_cell_late_lets_the_running_ones_finish_and_the_next_run_resumes(tmp_path, monkeypatch):
    from detptq_mini.benchmark import runner

    out = tmp_path / "s.json"
    log = []
    # cells 0 and 1 start at once; 1 ends at 0.2 s, before the stop at 1 s: 2 starts; it ends at 1.7 s: 3 never starts
    seconds = dict(zip([c.key for c in JOB_CELLS], [3.0, 0.2, 1.5, 0.2]))
    monkeypatch.setattr(runner, "run_cell", _stub_run_cell(log, seconds=seconds))
    run = run_suite(JOB_CELLS, out, jobs=2, stop_after=1 / 60)
    started = [k for k, *_ in log]
    assert sorted(started) == sorted(c.key for c in JOB_CELLS[:3])  # the 3rd started before the stop, ran after it
    assert run.ran == [c.key for c in JOB_CELLS[:3]] and run.not_started == [JOB_CELLS[3].key] and run.ok
    assert "1 not started (stop_after)" in run.summary()
    assert list(load_results(out)["cells"]) == [c.key for c in JOB_CELLS[:3]]  # the finished cells are recorded
    log.clear()
    monkeypatch.setattr(runner, "run_cell", _stub_run_cell(log))
    run = run_suite(JOB_CELLS, out, jobs=2)
    assert [k for k, *_ in log] == run.ran == [JOB_CELLS[3].key] and not run.not_started
    assert list(load_results(out)["cells"]) == [c.key for c in JOB_CELLS]


@pytest.mark.parametrize("value", [0, -1, "5", True, float("nan")])
def test_bad_stop_after_is_refused(value, tmp_path):
    with pytest.raises(ValueError, match="stop_after=.* must be a number of minutes > 0, or None"):
        run_suite(JOB_CELLS, tmp_path / "x.json", stop_after=value)


@pytest.mark.parametrize("value, word", [("0", "must be a finite number > 0"), ("soon", "'soon' is not a number"),
                                         ("inf", "must be a finite number > 0")])
def test_bad_stop_after_on_the_command_line_is_a_usage_error(value, word, tmp_path, capsys):
    assert main(["benchmark", "--quick", "--out", str(tmp_path / "q.json"), "--stop-after", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stop-after" in err[0] and word in err[0]


@pytest.mark.parametrize("jobs", [0, -1, 1.5, "2", True])
def test_bad_jobs_is_refused(jobs, tmp_path):
    with pytest.raises(ValueError, match=f"jobs={jobs!r} must be an integer >= 1"):
        run_suite(JOB_CELLS, tmp_path / "x.json", jobs=jobs)


@pytest.mark.parametrize("value, word", [("0", "argument --jobs: 0 must be > 0"),
                                         ("two", "argument --jobs: 'two' is not an integer"),
                                         ("1.5", "argument --jobs: '1.5' is not an integer")])
def test_bad_jobs_on_the_command_line_is_a_usage_error(value, word, tmp_path, capsys):
    assert main(["benchmark", "--quick", "--out", str(tmp_path / "q.json"), "--jobs", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]
    assert main(["quantize", "--method", "minmax", "--w-bits", "4", "--a-bits", "8", "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word.replace("--jobs", "--threads") in err[0]


def test_the_cli_passes_jobs_and_logs_it(tmp_path, monkeypatch):
    seen = {}

    def fake_run_suite(suite, out, **kw):
        seen.update(kw)
        return benchmark.SuiteRun(results={"suite": suite, "cells": {}}, out_path=out)

    monkeypatch.setattr(benchmark, "run_suite", fake_run_suite)
    assert main(["benchmark", "--quick", "--out", str(tmp_path / "q.json"), "--jobs", "2"]) == 0
    assert seen["jobs"] == 2 and seen["command"].endswith("--jobs 2")
    assert main(["benchmark", "--quick", "--out", str(tmp_path / "q.json")]) == 0
    assert seen["jobs"] == 1 and "--jobs" not in seen["command"] and seen["stop_after"] is None
    assert main(["benchmark", "--quick", "--out", str(tmp_path / "q.json"), "--stop-after", "90"]) == 0
    assert seen["stop_after"] == 90 and seen["command"].endswith("--stop-after 90")


def test_two_real_cells_at_once_each_with_its_share_of_the_threads(tmp_path):
    """The two cheapest cells of the quick suite, at once: each child runs with T // 2 torch threads (at least 1)
    and says so."""
    import torch

    cells = SUITES["quick"][:2]  # min-max and Lp p=2 at W4A8, 8 calibration images, 50 val images
    assert [c.method for c in cells] == ["minmax", "lp"]
    run = run_suite(cells, tmp_path / "real.json", jobs=2)
    assert run.ok and run.ran == [c.key for c in cells]
    data = load_results(tmp_path / "real.json")
    for c in cells:
        rec = data["cells"][c.key]
        assert rec["status"] == "ok" and rec["jobs"] == 2 and rec["threads"] == max(1, torch.get_num_threads() // 2)
        assert 0.0 <= rec["map"] <= 1.0


# --- the method rename: labels, renamed cells, the committed files, tools/migrate_results.py ----------------------

def test_labels_of_joint_brecq_and_the_two_coin_qdrop_rows():
    two = ("--qdrop-input", "two-coin")
    off = ("--no-8bit-stem", "--no-8bit-pred")
    recs = [_rec("qdrop", 0, 0.5, iters=10, extra=two), _rec("qdrop", 0, 0.6, iters=10),
            _rec("detptq-qdrop", 0, 0.4, iters=10, extra=two + off), _rec("detptq-qdrop", 0, 0.45, iters=10, extra=two),
            _rec("detptq-qdrop", 0, 0.7, iters=10, extra=("--quant-prob", "1")),
            _rec("detptq-qdrop", 0, 0.55, iters=10), _rec("joint", 0, 0.8, iters=10),
            _rec("joint", 0, 0.81, iters=10, extra=("--loss-norm", "before")), _rec("brecq", 0, 0.82, iters=10),
            _rec("qdrop", 0, 0.58, iters=10, extra=("--qdrop-input", "one-coin"))]
    s = summarize({"suite": "custom", "cells": {r["key"]: r for r in recs}})
    # the new rows of a method first, then its old two-coin rows: rows of their own
    assert [r["label"] for r in s["rows"]] == [
        "BRECQ", "joint", "joint (loss norm before)",
        "QDrop", "QDrop (qdrop input one-coin)", "QDrop (two coins)", "DetPTQ+QDrop",
        "DetPTQ+QDrop (quant prob 1)", "DetPTQ+QDrop (two coins)",
        "DetPTQ+QDrop (two coins; 8-bit stem/pred off)"]
    assert {r["label"]: r["cells"]["W4A4"]["map_mean"] for r in s["rows"]}["QDrop (two coins)"] == 0.5


def test_a_renamed_cell_stays_in_the_tables_and_in_its_place():
    quick = SUITES["quick"]
    old = next(c for c in quick if c.method == "qdrop")
    rec = _rec("qdrop", 0, 0.5, calib=old.calib, iters=old.iters, bits=(old.w_bits, old.a_bits), extra=TWO_COIN)
    rec["cell"]["val"] = old.val
    rec["key"] = Cell(**{**rec["cell"], "extra": TWO_COIN}).key
    assert rec["key"] not in {c.key for c in quick}
    rec["renamed_from"] = old.key
    first = _rec("minmax", 0, 0.4, calib=8, bits=(4, 8))
    first["key"], first["cell"]["val"] = quick[0].key, 50
    stale = _rec("joint", 0, 0.3, iters=3)
    stale["renamed_from"] = "brecq-W4A4-s0-c64-v500-i3"  # made under a key the suite no longer has
    cells = {stale["key"]: stale, rec["key"]: rec, first["key"]: first}
    s = summarize({"suite": "quick", "cells": cells})
    assert s["renamed"] == [rec["key"]] and s["excluded"] == [stale["key"]]
    assert [r["label"] for r in s["rows"]] == ["min-max", "QDrop (two coins)"]
    assert s["progress"]["ok"] == 1  # the suite's qdrop cell (another scheme now) is to do
    assert "1 cells were renamed after they ran" in to_markdown({"suite": "quick", "cells": cells})
    order = [c.key for c in quick]
    assert list(benchmark.ordered_cells(cells, order)) == [first["key"], rec["key"], stale["key"]]
    cells[old.key] = {"key": old.key}  # the suite's own cell of that key comes first, the renamed one right after
    assert list(benchmark.ordered_cells(cells, order)) == [first["key"], old.key, rec["key"], stale["key"]]


def _migrate_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "migrate_results.py"
    spec = importlib.util.spec_from_file_location("migrate_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_migrate_results_renames_only_cells_made_before_the_change_and_is_idempotent(tmp_path):
    mig = _migrate_module()
    opts = {"iters": 10, "lr": (0.01, 0.001)}
    recs = [_rec("brecq", 0, 0.8, **opts), _rec("qdrop", 0, 0.5, **opts),
            _rec("detptq-qdrop", 0, 0.4, extra=("--loss-norm", "before"), **opts),
            _rec("detptq-qdrop", 0, 0.7, extra=("--quant-prob", "1"), **opts),  # no coin: unchanged
            _rec("lp", 0, 0.3, p=2.0)]
    for r in recs:
        r.update(method=r["cell"]["method"], config={"method": r["cell"]["method"]})
    new_brecq = _rec("brecq", 1, 0.9, **opts)  # made after the change: two stages, keeps its name
    new_brecq["config"] = {"stages": 2}
    new_qdrop = _rec("qdrop", 1, 0.6, **opts)
    new_qdrop["config"] = {"qdrop_input": "one-coin"}
    recs += [new_brecq, new_qdrop]
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"suite": "custom", "machine": MACHINE, "runs": [], "cells": {r["key"]: r for r in recs}}))
    assert mig.main([str(path), "--check"]) == 1 and json.loads(path.read_text())["cells"] == {r["key"]: r for r in recs}
    assert mig.main([str(path)]) == 0
    data = load_results(path)
    assert list(data["cells"]) == [
        "joint-W4A4-s0-c64-v500-i10-lrv0.01-lra0.001", "qdrop-W4A4-s0-c64-v500-i10-lrv0.01-lra0.001+qdrop-input+two-coin",
        "detptq-qdrop-W4A4-s0-c64-v500-i10-lrv0.01-lra0.001+loss-norm+before+qdrop-input+two-coin",
        recs[3]["key"], recs[4]["key"], new_brecq["key"], new_qdrop["key"]]  # each where it was
    joint, qdrop = data["cells"]["joint-W4A4-s0-c64-v500-i10-lrv0.01-lra0.001"], data["cells"][
        "qdrop-W4A4-s0-c64-v500-i10-lrv0.01-lra0.001+qdrop-input+two-coin"]
    assert (joint["method"], joint["cell"]["method"], joint["renamed_from"]) == ("joint", "joint", recs[0]["key"])
    assert joint["config"] == {"method": "brecq"} and "'brecq'" in joint["migrated"]  # config as recorded
    assert qdrop["cell"]["extra"] == ["--qdrop-input", "two-coin"] and qdrop["config"]["qdrop_input"] == "two-coin"
    assert "two-coin" in qdrop["migrated"] and qdrop["map"] == 0.5
    for key, rec in data["cells"].items():
        assert key == rec["key"] == Cell(**{**rec["cell"], "extra": tuple(rec["cell"]["extra"])}).key
    assert (tmp_path / "custom.md").read_text() == to_markdown(data)
    before = path.read_bytes()
    assert mig.main([str(path)]) == 0 and mig.main([str(path), "--check"]) == 0 and path.read_bytes() == before
    # a new key already in the file: refused, nothing written
    clash = {"suite": "custom", "machine": MACHINE, "cells": {r["key"]: r for r in [_rec("brecq", 0, 0.8),
                                                                                    _rec("joint", 0, 0.8)]}}
    path.write_text(json.dumps(clash))
    assert mig.main([str(path)]) == 2 and json.loads(path.read_text()) == clash


def test_the_committed_results_say_the_methods_new_names():
    """After tools/migrate_results.py: no brecq cell made before two-stage BRECQ existed, every QDrop cell that
    tossed coins is the two-coin ablation, and every key is its cell's."""
    from pathlib import Path

    mig = _migrate_module()
    for name in ("full", "ablations", "loss-norm"):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{name}.json"
        data = load_results(path)
        for key, rec in data["cells"].items():
            assert key == rec["key"] == Cell(**{**rec["cell"], "extra": tuple(rec["cell"]["extra"])}).key, key
            if key.startswith("brecq-"):
                assert "stages" in rec["config"], key
            if key.startswith(("qdrop-", "detptq-qdrop-")) and "+quant-prob+1" not in key:
                # made by the reference-faithful code (it records its coin), or the two-coin ablation
                made_one_coin = rec["config"].get("qdrop_input") == "one-coin"
                assert made_one_coin != key.endswith("+qdrop-input+two-coin"), key
        assert mig.migrate_results(data)[1] == {}  # nothing left to migrate
    full = load_results(path.with_name("full.json"))
    labels = {r["label"] for r in summarize(full)["rows"]}
    assert {"BRECQ", "joint", "QDrop", "DetPTQ+QDrop", "QDrop (two coins)", "DetPTQ+QDrop (two coins)"} <= labels


def test_recon_suite_e3_e4_cells_are_detptq_inside_the_joint_scheme():
    recon, abl_keys = SUITES["recon"], {c.key for c in SUITES["ablations"]}
    e3 = [c for c in recon if c.method == "detptq-qdrop" and c.extra[:2] == ("--quant-prob", "1")]
    assert len(e3) == 4 * 3  # both, scales, loss, rest quantized; three seeds
    assert {c.extra[2:] for c in e3} == {(), ("--detptq-use", "scales"), ("--detptq-use", "loss"),
                                         ("--rest", "quantized")}
    assert {c.key for c in e3 if c.extra[2:] == ()} <= abl_keys  # "both" is the ablations' cell: reused


def _recon_rec(method, seed, losses, status="ok"):
    rec = _rec(method, seed, 0.5, iters=10, status=status)
    if status == "ok":
        rec["reconstruction"] = {"units": {u: {"before": 2 * v, "after": v, "after_mse": v + 1}
                                           for u, v in losses.items()}}
    return rec


def test_unit_losses_mean_over_the_cells_in_forward_order():
    a = _recon_rec("qdrop", 0, {"stem": 1.0, "down1": 4.0})
    b = _recon_rec("qdrop", 1, {"stem": 3.0, "down1": 8.0})
    results = {"cells": {r["key"]: r for r in (a, b)}}
    assert unit_losses(results, [a["key"], b["key"]]) == {"stem": 3.0, "down1": 7.0}  # after_mse = after + 1
    assert list(unit_losses(results, [a["key"], b["key"]], "before")) == ["stem", "down1"]
    assert unit_losses(results, a["key"], "after") == {"stem": 1.0, "down1": 4.0}


def test_unit_losses_refuses_what_it_cannot_average():
    a = _recon_rec("qdrop", 0, {"stem": 1.0})
    other = _recon_rec("qdrop", 1, {"down1": 1.0})
    failed = _recon_rec("qdrop", 2, {}, status="failed")
    plain = _rec("lp", 0, 0.5, p=2.0)
    results = {"cells": {r["key"]: r for r in (a, other, failed, plain)}}
    with pytest.raises(ValueError, match="field='mse'; allowed"):
        unit_losses(results, [a["key"]], "mse")
    with pytest.raises(ValueError, match="keys is empty"):
        unit_losses(results, [])
    for key, match in ((failed["key"], "not a successful cell"), ("nope", "not a successful cell"),
                       (plain["key"], "no per-unit 'after_mse'")):
        with pytest.raises(ValueError, match=match):
            unit_losses(results, [key])
    with pytest.raises(ValueError, match="same units"):
        unit_losses(results, [a["key"], other["key"]])


def _stats(values):
    """A summarize() cell of these per-seed mAPs."""
    import statistics

    return {"n": len(values), "map_mean": statistics.fmean(values),
            "map_std": statistics.stdev(values) if len(values) > 1 else None}


def test_compare_applies_the_two_pooled_std_rule():
    import statistics

    from detptq_mini.benchmark import compare

    a, b = [0.80, 0.82, 0.81], [0.70, 0.71, 0.69]
    c = compare(_stats(a), _stats(b))
    pooled = ((statistics.variance(a) * 2 + statistics.variance(b) * 2) / 4) ** 0.5
    assert c.gap == pytest.approx(0.11) and c.pooled_std == pytest.approx(pooled) and (c.n_a, c.n_b) == (3, 3)
    assert c.verdict == "a" and c.a_beats_b and not c.b_beats_a
    assert compare(_stats(b), _stats(a)).verdict == "b"
    assert "A ahead by more than 2 pooled std" in str(c) and "+0.1100" in str(c)
    # a gap of 1.5 pooled std: noise at k = 2, A ahead at k = 1
    near = [v + 1.5 * pooled for v in b]
    assert compare(_stats(near), _stats(b)).verdict == "noise"
    assert compare(_stats(near), _stats(b), k=1).verdict == "a"
    # one seed a side: no claim, however large the gap; one seed on one side: the other side's spread judges it
    assert compare(_stats([0.9]), _stats([0.1])).verdict == "one seed"
    one = compare(_stats([0.80]), _stats(b))
    assert one.pooled_std == pytest.approx((statistics.variance(b) * 2 / 2) ** 0.5) and one.verdict == "a"


def test_compare_on_the_committed_results_matches_a_computation_by_hand():
    import statistics

    from detptq_mini.benchmark import compare

    full = load_results(ROOT / "benchmarks" / "results" / "full.json")
    rows = {r["label"]: r for r in summarize(full)["rows"]}
    a, b = rows["joint"]["cells"]["W4A4"], rows["QDrop (two coins)"]["cells"]["W4A4"]
    va = [full["cells"][k]["map"] for k in a["keys"]]
    vb = [full["cells"][k]["map"] for k in b["keys"]]
    pooled = (((len(va) - 1) * statistics.variance(va) + (len(vb) - 1) * statistics.variance(vb))
              / (len(va) + len(vb) - 2)) ** 0.5
    c = compare(a, b)
    assert c.gap == pytest.approx(statistics.fmean(va) - statistics.fmean(vb))
    assert c.pooled_std == pytest.approx(pooled)
    assert c.verdict == ("a" if c.gap > 2 * pooled else "b" if -c.gap > 2 * pooled else "noise")


@pytest.mark.parametrize("kw, word", [({"field": "ratio"}, "field='ratio' must be 'map' or 'map50'"),
                                      ({"k": 0}, "k=0 must be a finite number > 0"),
                                      ({"k": True}, "k=True must be a finite number > 0")])
def test_compare_refuses_bad_arguments(kw, word):
    from detptq_mini.benchmark import compare

    with pytest.raises(ValueError, match=re.escape(word)):
        compare(_stats([0.1, 0.2]), _stats([0.1, 0.3]), **kw)
    with pytest.raises(ValueError, match="b must be a cell of summarize"):
        compare(_stats([0.1, 0.2]), {"map": 0.1})


# --- cells on another model (--model) ------------------------------------------------------------------------------

def test_a_cell_on_retinanet_has_the_model_first_in_its_key_and_every_yolo_key_is_unchanged():
    from dataclasses import asdict

    from detptq_mini.benchmark import on_model

    c = Cell("lp", 4, 4, 0, p=2.4, calib=128)
    r = Cell("lp", 4, 4, 0, p=2.4, calib=128, model="retinanet-r18")
    assert c.model == "yolo" and c.key == "lp-p2.4-W4A4-s0-c128-v500"
    assert r.key == "retinanet-r18-lp-p2.4-W4A4-s0-c128-v500"
    assert cell_args(r)[:3] == ["quantize", "--model", "retinanet-r18"] and "--model" not in cell_args(c)
    for cells in SUITES.values():  # a record made before the field (no "model") rebuilds the same key
        for cell in cells:
            old = {k: v for k, v in asdict(cell).items() if k != "model"}
            assert cell.model == "yolo" and Cell(**old).key == cell.key and not cell.key.startswith("retinanet")
    assert [x.key for x in on_model(SUITES["quick"], "retinanet-r18")] == [
        "retinanet-r18-" + x.key for x in SUITES["quick"]]
    assert on_model(SUITES["quick"], "yolo") == SUITES["quick"]
    with pytest.raises(ValueError, match=r"model='r50' is not allowed; allowed: 'yolo', 'retinanet-r18'"):
        Cell("lp", 4, 4, model="r50")


def test_a_suite_on_retinanet_goes_to_its_own_file_its_records_carry_the_model(tmp_path, monkeypatch, capsys):
    from detptq_mini.benchmark import runner

    log = []
    monkeypatch.setattr(runner, "run_cell", _stub_run_cell(log, seconds={f"retinanet-r18-{c.key}": 0.0
                                                                         for c in SUITES["quick"]}))
    out = tmp_path / "r.json"
    run = run_suite("quick", out, only="minmax", model="retinanet-r18")
    assert run.ran == ["retinanet-r18-minmax-W4A8-s0-c8-v50"] and log[0][0] == run.ran[0]
    data = load_results(out)
    assert data["model"] == "retinanet-r18" and data["cells"][run.ran[0]]["cell"]["model"] == "retinanet-r18"
    summary = summarize(data)
    assert summary["progress"]["ok"] == 1 and summary["rows"][0]["model"] == "retinanet-r18"
    with pytest.raises(ValueError, match="holds suite 'quick' on model 'retinanet-r18', not 'yolo'"):
        run_suite("quick", out, only="minmax")
    assert main(["benchmark", "--suite", "quick", "--model", "retinanet-r18", "--out", str(out), "--list"]) == 0
    assert "retinanet-r18-minmax-W4A8-s0-c8-v50\tok" in capsys.readouterr().out


def test_a_real_cell_record_says_its_model():
    from detptq_mini.benchmark import run_cell

    rec = run_cell(Cell("nope", 8, 8, calib=2, val=2, model="retinanet-r18"))
    assert rec["model"] == "retinanet-r18" and rec["status"] == "failed" and "--method 'nope'" in rec["error"]


def test_a_killed_reconstruction_cell_goes_on_from_its_last_unit(tmp_path, monkeypatch, cli):
    """run_cell gives a reconstruction cell ``quantize --state``: a run stopped part-way (here: a Ctrl-C at the
    sixth unit, in this process) leaves its progress, and the cell's next run resumes it, counts both runs' time,
    and deletes the file. Other cells get no state."""
    import detptq_mini.reconstruction as rec
    from detptq_mini.benchmark import cell_args, run_cell

    cell = Cell("qdrop", 4, 4, calib=8, val=10, iters=2)
    state_dir = tmp_path / ".state"
    state_dir.mkdir()
    state = state_dir / f"{cell.key}.state"
    real, calls = rec.reconstruct_unit, []

    def killed_at_unit_6(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "reconstruct_unit", killed_at_unit_6)
    with pytest.raises(KeyboardInterrupt):
        cli(*cell_args(cell, state=state)[:-1])  # the cell's own command (without --json), in this process
    monkeypatch.setattr(rec, "reconstruct_unit", real)
    assert state.is_file()
    r = run_cell(cell, state_dir=state_dir)
    assert r["status"] == "ok", r.get("error")
    assert r["resumed"]["runs"] == 1 and r["resumed"]["seconds_before"] > 0
    assert r["wall_seconds"] > r["resumed"]["seconds_before"] and r["cpu_seconds"] > r["resumed"]["cpu_seconds_before"]
    assert not state.exists() and len(r["reconstruction"]["units"]) == 22
    assert "--state" not in cell_args(Cell("minmax", 4, 4)) and "--state" not in cell_args(cell)
