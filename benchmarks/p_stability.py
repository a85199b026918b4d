"""How stable is DetPTQ's chosen p across calibration seeds? (experiment E5 of the reconstruction experiments)

Reads committed benchmark results (no computation of its own) and, for every DetPTQ row (a method that chooses p:
``detptq`` per layer, ``detptq-qdrop`` per unit; one row per bits and options) with at least two seeds done, reports:

* ``items``: layers (``detptq``) or units (``detptq-qdrop``) whose p is chosen;
* ``same_all``: the share of items whose chosen p is the same on every seed;
* ``pairwise``: the share of (item, pair of seeds) with the same p; ``chance``: what independent uniform choices
  among the candidates would give (1 / number of candidates);
* ``mean_abs_diff``: the mean |p_a - p_b| over items and pairs of seeds;
* where the records carry DetPTQ's selection table (cells made after ``quantize --json`` started to include it):
  ``margin_median``: the median over items and seeds of the relative ODOL margin between the best and the
  second-best candidate, ``(ODOL_2nd - ODOL_best) / ODOL_best``, and ``margin_below_1pct``: the share of items
  whose margin is below 1 %.

Usage::

    python benchmarks/p_stability.py            # prints a table, writes benchmarks/results/p_stability.json

The output says which files and cells each row came from.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

from detptq_mini.benchmark import summarize
from detptq_mini.lp import P_DEFAULT
from detptq_mini.model import Detector
from detptq_mini.utils import atomic_write_json

_MODEL = Detector()  # the shipped architecture: maps a conv to its unit (no weights needed)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FILES = ("full.json", "ablations.json", "recon.json")


def _items(rec: dict) -> dict[str, float]:
    """item -> chosen p: per layer for ``detptq``; per unit for ``detptq-qdrop`` (from the selection when the record
    has it, else from the per-layer report: the layers of a unit share its p)."""
    sel = rec.get("selection")
    if sel is not None and "chosen" in sel:
        return {k: float(v) for k, v in sel["chosen"].items()}
    chosen = rec["chosen_p"]
    if rec["method"] == "detptq-qdrop":
        units = rec.get("reconstruction", {}).get("units")
        if units:
            return {u: float(h["p"]) for u, h in units.items()}
        return {_MODEL.unit_of(layer): float(p) for layer, p in chosen.items()}  # a unit's layers share its p
    return {k: float(v) for k, v in chosen.items()}


def _margins(rec: dict) -> list[float]:
    sel = rec.get("selection")
    if not sel or "table" not in sel:
        return []
    out = []
    for row in sel["table"].values():
        vals = sorted(row.values())
        if len(vals) >= 2 and vals[0] > 0:
            out.append((vals[1] - vals[0]) / vals[0])
    return out


def stability(rows: list[dict], recs_of) -> list[dict]:
    out = []
    for row in rows:
        if row["method"] not in ("detptq", "detptq-qdrop"):
            continue
        for bits, c in row["cells"].items():
            recs = recs_of(c["keys"])
            if len(recs) < 2:
                continue
            chosen = [_items(r) for r in recs]
            items = sorted(set.intersection(*(set(ch) for ch in chosen)))
            if not items:
                print("no common items:", row["label"], bits, [list(ch)[:2] for ch in chosen], file=sys.stderr)
                continue
            pairs = list(itertools.combinations(range(len(recs)), 2))
            same_pairs = sum(chosen[a][i] == chosen[b][i] for i in items for a, b in pairs)
            n_cand = len((recs[0].get("config") or {}).get("ps") or P_DEFAULT)
            margins = [m for r in recs for m in _margins(r)]
            entry = {"label": row["label"], "bits": bits, "seeds": len(recs), "items": len(items),
                     "same_all": sum(len({ch[i] for ch in chosen}) == 1 for i in items) / len(items),
                     "pairwise": same_pairs / (len(items) * len(pairs)), "chance": 1 / n_cand,
                     "mean_abs_diff": statistics.fmean(abs(chosen[a][i] - chosen[b][i]) for i in items
                                                       for a, b in pairs),
                     "keys": sorted(c["keys"])}
            if margins:
                entry["margin_median"] = statistics.median(margins)
                entry["margin_below_1pct"] = sum(m < 0.01 for m in margins) / len(margins)
            out.append(entry)
    return out


def main() -> int:
    report = {"source": {}, "rows": []}
    for name in FILES:
        path = RESULTS / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        s = summarize(data)
        rows = stability(s["rows"], lambda keys: [data["cells"][k] for k in sorted(keys)])
        for r in rows:
            r["file"] = name
        report["rows"] += rows
        report["source"][name] = len(rows)
    print(f"{'row':44s} {'bits':5s} {'n':>2s} {'items':>5s} {'same, all':>9s} {'pairwise':>8s} {'chance':>6s} "
          f"{'|dp|':>5s} {'margin':>7s}")
    for r in report["rows"]:
        margin = f"{r['margin_median']:7.2%}" if "margin_median" in r else "      —"
        print(f"{r['label'][:44]:44s} {r['bits']:5s} {r['seeds']:2d} {r['items']:5d} {r['same_all']:9.1%} "
              f"{r['pairwise']:8.1%} {r['chance']:6.1%} {r['mean_abs_diff']:5.2f} {margin}")
    atomic_write_json(RESULTS / "p_stability.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
