"""The benchmark's report: a result file as tables, one JSON-ready dict (:func:`summarize`) or markdown
(:func:`to_markdown`).

A row per method (with its options), a column per bits, mean ± std over calibration seeds, % of FP, the cost of a
cell, the settings of each row, then the commands that made the file and the machine.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..lp import P_DEFAULT
from .suites import SUITES, bits_pair, is_done, on_model

__all__ = ["METHOD_NAMES", "Comparison", "compare", "row_of", "cell_of", "summarize", "to_markdown", "unit_losses"]


#: Display names of the methods, in table order (unknown methods follow, in order of appearance). ``brecq`` is the
#: published two-stage BRECQ; ``joint`` learns the rounding and the step sizes together with every activation
#: quantized (what the cells called ``brecq`` before the rename ran: ``tools/migrate_results.py``). A name's
#: parenthesis takes a row's options too: ``joint (loss norm before)``.
METHOD_NAMES: dict[str, str] = {"minmax": "min-max", "lp": "Lp", "detptq": "DetPTQ simple",
                                "brecq": "BRECQ", "joint": "joint",
                                "qdrop": "QDrop", "detptq-qdrop": "DetPTQ+QDrop"}
_GROUP_FIELDS = ("method", "p", "w_bits", "a_bits", "calib", "val", "iters", "lr_v", "lr_act", "extra", "model")
_ODOL_NAMES = {"kl": "KL", "l2": "L2", "l1": "L1", "iou": "IoU"}
#: ``--qdrop-input`` values named in a row's label (others are shown as ``qdrop input <value>``): the earlier QDrop
#: scheme, which the cells called ``qdrop`` and ``detptq-qdrop`` ran before QDrop was made the reference's.
_QDROP_INPUT_NAMES = {"two-coin": "two coins"}
# the layer protocols (``--protocol``) other than the default, as a row's name shows them: "DetPTQ simple, head FP"
_PROTOCOL_NAMES = {"head-fp": "head FP"}


def _cells_of(results: dict) -> dict:
    return results["cells"] if isinstance(results.get("cells"), dict) else results


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def unit_losses(results: dict, keys, field: str = "after_mse") -> dict[str, float]:
    """Each unit's loss after reconstruction, the mean over the cells ``keys`` (e.g. a row's seeds).

    Args:
        results: a result file's dict (:func:`~detptq_mini.benchmark.runner.load_results`).
        keys: the cells' keys (``summarize(...)`` gives a row's per bits: ``row["cells"]["W4A4"]["keys"]``).
        field: ``"after_mse"`` (default: the p = 2 loss of the unit's output with the quantized prefix as input,
            every element quantized, the same measure for every method), ``"after"`` (with the unit's own p) or
            ``"before"`` (before the unit was reconstructed).

    Returns:
        ``{unit: mean loss}`` in forward order. A key that is not a successful cell, or a cell without the
        per-unit losses (a method without reconstruction, or a record made before they were kept), is an error.
    """
    allowed = ("after_mse", "after", "before")
    if field not in allowed:
        raise ValueError(f"field={field!r}; allowed: {', '.join(allowed)}")
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("keys is empty: give the keys of one or more cells")
    cells = _cells_of(results)
    per_unit: dict[str, list[float]] = {}
    for key in keys:
        rec = cells.get(key)
        if rec is None or not is_done(rec):
            raise ValueError(f"keys: {key!r} is not a successful cell of this result file")
        units = (rec.get("reconstruction") or {}).get("units")
        if not units or any(u.get(field) is None for u in units.values()):
            raise ValueError(f"keys: cell {key!r} has no per-unit {field!r} losses (no reconstruction, or made "
                             "before they were recorded)")
        for name, u in units.items():
            per_unit.setdefault(name, []).append(u[field])
    if any(len(v) != len(keys) for v in per_unit.values()):
        raise ValueError(f"keys: the cells {keys!r} do not reconstruct the same units")
    return {name: statistics.fmean(v) for name, v in per_unit.items()}


def row_of(summary: dict, label: str) -> dict:
    """The row of :func:`summarize`'s ``summary`` whose ``label`` is ``label`` (e.g. ``"Lp p=2"``, ``"joint"``,
    ``"QDrop (two coins)"``); an unknown label is an error that lists the labels there are."""
    for row in summary["rows"]:
        if row["label"] == label:
            return row
    raise ValueError(f"label={label!r} is not a row of the summary; allowed: {[r['label'] for r in summary['rows']]!r}")


def cell_of(summary: dict, label: str, bits: str) -> dict | None:
    """The table entry of row ``label`` at ``bits`` (e.g. ``"W4A4"``): ``{"n", "seeds", "keys", "map_mean",
    "map_std", ...}`` over the calibration seeds done (see :func:`summarize`), or None when that row has no cell
    done at those bits. An unknown label is an error (:func:`row_of`)."""
    return row_of(summary, label)["cells"].get(bits)


@dataclass(frozen=True)
class Comparison:
    """Two rows' cells compared over calibration seeds (:func:`compare`).

    Attributes:
        gap: mean of A minus mean of B.
        pooled_std: the pooled sample standard deviation of the two rows' seeds, or None when neither row has two
            seeds.
        n_a, n_b: how many seeds each mean is over.
        k: the multiple of ``pooled_std`` the gap must exceed.
        verdict: ``"a"`` (A ahead: ``gap > k * pooled_std``), ``"b"`` (B ahead: ``-gap > k * pooled_std``),
            ``"noise"`` (within ``k`` pooled standard deviations) or ``"one seed"`` (no spread to judge by).
    """

    gap: float
    pooled_std: float | None
    n_a: int
    n_b: int
    k: float
    verdict: str

    @property
    def a_beats_b(self) -> bool:
        return self.verdict == "a"

    @property
    def b_beats_a(self) -> bool:
        return self.verdict == "b"

    def __str__(self) -> str:
        spread = "no spread (one seed each)" if self.pooled_std is None else f"pooled std {self.pooled_std:.4f}"
        words = {"a": f"A ahead by more than {self.k:g} pooled std", "b": f"B ahead by more than {self.k:g} pooled std",
                 "noise": "within noise", "one seed": "one seed: no claim"}[self.verdict]
        return f"A - B = {self.gap:+.4f} ({self.n_a} and {self.n_b} seeds, {spread}): {words}"


def compare(a: dict, b: dict, field: str = "map", k: float = 2.0) -> Comparison:
    """Whether row A beats row B at one bits column, by the rule the book uses for every "A beats B" claim: the
    gap between the means over calibration seeds must exceed ``k`` (default 2) times the pooled standard deviation
    of the seeds; otherwise the two are "within noise".

    Args:
        a, b: a row's cell of :func:`summarize` (``row["cells"][bits]``: ``{"n", "<field>_mean", "<field>_std",
            ...}``).
        field: ``"map"`` (mAP50:95) or ``"map50"``.
        k: a number > 0.

    The pooled variance is ``((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)``; a row of one seed adds no
    spread of its own. With one seed on both sides there is no spread to judge by: the verdict is ``"one seed"``.
    """
    if field not in ("map", "map50"):
        raise ValueError(f"field={field!r} must be 'map' or 'map50'")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0 or math.isinf(k):
        raise ValueError(f"k={k!r} must be a finite number > 0")
    for name, c in (("a", a), ("b", b)):
        if not isinstance(c, dict) or f"{field}_mean" not in c or "n" not in c:
            raise ValueError(f"{name} must be a cell of summarize()'s rows (with 'n' and '{field}_mean'), "
                             f"got {c!r:.80}")
    n_a, n_b = a["n"], b["n"]
    gap = a[f"{field}_mean"] - b[f"{field}_mean"]
    df = n_a + n_b - 2
    if n_a < 2 and n_b < 2:
        return Comparison(gap, None, n_a, n_b, k, "one seed")
    var = sum((n - 1) * (c[f"{field}_std"] or 0.0) ** 2 for n, c in ((n_a, a), (n_b, b)) if n > 1) / df
    pooled = math.sqrt(var)
    verdict = "a" if gap > k * pooled else "b" if -gap > k * pooled else "noise"
    return Comparison(gap, pooled, n_a, n_b, k, verdict)


def _seed_groups(cells: dict) -> list[dict]:
    """The successful records grouped over seeds: one per (method, p, bits, calib, val, budget, extra).

    The budget is (iters, lr_v, lr_act); records made before the learning rates were cell fields have None there.
    """
    groups: dict[tuple, list[dict]] = {}
    for rec in cells.values():
        if not is_done(rec):
            continue
        cell = rec["cell"]
        # a record made before cells had a model is of the yolo model
        gk = tuple(tuple(v) if isinstance(v, list) else v
                   for v in (cell.get(f, "yolo" if f == "model" else None) for f in _GROUP_FIELDS))
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
            "ratio_to_fp_mean": _mean(r.get("ratio_to_fp") for r in recs),  # None: an FP mAP of 0
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


def _qdrop_input_name(extra) -> str | None:
    """The label's name of a row's ``--qdrop-input`` (``"two coins"``), or None (not set, or not named)."""
    return _QDROP_INPUT_NAMES.get(dict(_options(extra)).get("--qdrop-input"))


def _protocol(extra) -> str | None:
    """The layer protocol of a cell's extra arguments when a row's name shows it (``--protocol head-fp``), else None."""
    protocol = dict(_options(extra)).get("--protocol")
    return protocol if protocol in _PROTOCOL_NAMES else None


def _extra_label(extra) -> list[str]:
    """Readable names of a cell's extra ``quantize`` arguments (ODOL combination, 8-bit conventions off, ...), but
    a ``--qdrop-input`` of :data:`_QDROP_INPUT_NAMES`, which the label puts with the method's name."""
    opts = dict(_options(extra))
    if _qdrop_input_name(extra) is not None:
        opts.pop("--qdrop-input")
    if _protocol(extra) is not None:  # part of the row's name (see _row_label), not an option
        opts.pop("--protocol")
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
    w, a = bits_pair(bits)
    return -w, -a  # W8A8, W4A8, W4A4, W3A3


def summarize(results: dict) -> dict:
    """The tables of a result file as one JSON-ready dict: rows are methods (with options), columns are bits.

    Args:
        results: a result file's content (``{"suite", "machine", "runs", "cells"}``) or its ``cells`` mapping.

    Returns:
        ``{"suite", "machine", "commands", "progress", "fp", "bits", "rows", "failed", "excluded", "renamed"}``:

        * ``bits``: the bits columns (``"W8A8"``, ``"W4A8"``, ...), widest first;
        * ``rows``: one per method and options, in table order (min-max, Lp by p, best fixed p, DetPTQ simple,
          BRECQ, joint, QDrop, DetPTQ+QDrop; within a method, rows with extra options after the plain
          one, the two-coin QDrop rows of ``--qdrop-input two-coin`` after those, and a layer protocol other than
          the default, ``--protocol head-fp``, in rows of its own after the method's others, named e.g. "DetPTQ
          simple, head FP"), each ``{"label", "method", "p", "calib", "val", "extra", "best_fixed_p", "cells"}``
          where ``cells`` maps a bits column to ``{"n", "seeds", "keys", "map_mean", "map_std", "map50_mean",
          "map50_std", "ratio_to_fp_mean", "wall_seconds_mean", "cpu_seconds_mean", "peak_rss_mb_max", "calib",
          "val", "iters"}`` over the successful cells (stds are sample standard deviations over seeds, None for
          one seed). Calibration and val images are in the label only when they differ between rows; rows
          differing only in ``iters`` at the same bits are split, with the budget in the label.
        * the ``best_fixed_p`` row (after the Lp rows, when at least two p of ``P_DEFAULT`` have results at a
          bits): per bits, the Lp row with p in ``P_DEFAULT`` whose mean mAP50:95 over seeds is highest, with
          its ``p``, every candidate's mean in ``candidates`` and ``complete`` (every p of ``P_DEFAULT`` has
          results; a partial sweep is no oracle yet, and the markdown says "partial"). This is an oracle choice
          made on the val set that also measures it: an optimistic bound on any fixed p.
        * ``fp``: the FP reference ``{"val", "map", "map50"}`` per val-set size; ``progress``: ``{"cells", "ok",
          "failed", "todo"}`` against the suite's current definition (or the file alone for ``"custom"``);
          ``excluded``: keys of records in the file that are not in the suite's current definition (e.g. an
          earlier iteration budget), left out of the rows; ``renamed``: keys of records renamed after they were
          run (their ``renamed_from``, e.g. ``brecq-...`` -> ``joint-...`` by ``tools/migrate_results.py``): such a
          record is in the rows, under its new name, while the key it was made under is a cell of the suite (which
          is then to do: the name now means another method); ``failed``: ``[{"key", "error"}]``; ``commands``:
          the distinct commands of the file's ``runs`` with how often each ran.
    """
    cells = _cells_of(results)
    suite = results.get("suite") if "cells" in results else None
    # a file of a suite run on another model than yolo says so (run_suite(model=...))
    expected = [c.key for c in on_model(SUITES[suite], results.get("model", "yolo"))] if suite in SUITES else None
    in_suite = set(expected or ())
    renamed = [k for k, rec in cells.items() if isinstance(rec, dict) and rec.get("renamed_from")
               and (expected is None or k not in in_suite and rec["renamed_from"] in in_suite)]
    if expected is not None:
        used = {k: rec for k, rec in cells.items() if k in in_suite or k in set(renamed)}
        excluded = [k for k in cells if k not in used]
        n_ok = sum(is_done(cells.get(k)) for k in expected)
        n_failed = sum(k in cells and not is_done(cells[k]) for k in expected)
        progress = {"cells": len(expected), "ok": n_ok, "failed": n_failed, "todo": len(expected) - n_ok - n_failed}
    else:
        excluded, used = [], dict(cells)
        n_ok = sum(is_done(r) for r in cells.values())
        progress = {"cells": len(cells), "ok": n_ok, "failed": len(cells) - n_ok, "todo": 0}
    groups = _seed_groups(used)

    # rows: (method, p, calib, val, extra), split by budget where one bits column would get two budgets
    def rid(g):
        return g["method"], g["p"], g["calib"], g["val"], tuple(g["extra"]), g["model"]

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
        if g["model"] != "yolo":
            row["model"] = g["model"]
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
            best_cells[bits] = {**stats, "p": p, "candidates": {f"{q:g}": s["map_mean"] for q, s in cand},
                                "complete": {q for q, _ in cand} == set(P_DEFAULT)}
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
    # per method: the default protocol's rows, then each named protocol's; within each, the plain row first and the
    # two-coin QDrop rows last
    rows_list.sort(key=lambda row: (rank[row["method"]], _protocol(row["extra"]) or "",
                                    _qdrop_input_name(row["extra"]) is not None,
                                    bool(_extra_label(row["extra"])), variant[_variant(row)], row["best_fixed_p"],
                                    -1 if row["p"] is None else row["p"]))
    vary_calib = len({row["calib"] for row in rows_list}) > 1
    vary_val = len({row["val"] for row in rows_list}) > 1
    for row in rows_list:
        row["label"] = _row_label(row, vary_calib, vary_val)
    rows_out = [{"label": row.pop("label"), **row} for row in rows_list]

    fp: dict[int, dict] = {}
    for rec in used.values():
        if is_done(rec) and "fp_map" in rec:
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
                   for k, rec in used.items() if not is_done(rec)],
        "excluded": excluded,
        "renamed": renamed,
    }


def _variant(row: dict) -> tuple:
    return (row["method"], row["calib"], row["val"], tuple(row["extra"]), row["iters"], row["lr_v"], row["lr_act"])


def _budget_text(iters, lr_v=None, lr_act=None) -> str:
    """``1000`` -> ``"iters 1000"``; with learning rates ``"iters 1000, lr V 0.01, lr act 0.001"``."""
    parts = [] if iters is None else [f"iters {iters}"]
    parts += [f"{name} {v:g}" for name, v in (("lr V", lr_v), ("lr act", lr_act)) if v is not None]
    return ", ".join(parts)


def _row_label(row: dict, vary_calib: bool, vary_val: bool) -> str:
    """The method's name, then in one parenthesis what the name qualifies (``two coins``) and,
    after a semicolon, the row's options: ``DetPTQ+QDrop (two coins; 8-bit stem/pred off)``."""
    kinds = []
    if row["best_fixed_p"]:
        name = "Lp, best fixed p (oracle)"
    elif row["method"] == "lp":
        name = f"Lp p={row['p']:g}"
    else:
        name = METHOD_NAMES.get(row["method"], row["method"])
        if name.endswith(")") and " (" in name:
            name, kind = name[:-1].split(" (", 1)
            kinds.append(kind)
        if row["p"] is not None:
            name += f" p={row['p']:g}"
    kinds += [k for k in [_qdrop_input_name(row["extra"])] if k is not None]
    protocol = _protocol(row["extra"])
    if protocol is not None:  # another set of quantized layers: another method, so in the name
        name += f", {_PROTOCOL_NAMES[protocol]}"
    opts = _extra_label(row["extra"])
    if vary_calib:
        opts.append(f"calib {row['calib']}")
    if vary_val:
        opts.append(f"val {row['val']}")
    if any(row[k] is not None for k in ("iters", "lr_v", "lr_act")):
        opts.append(_budget_text(row["iters"], row["lr_v"], row["lr_act"]))
    inside = "; ".join(", ".join(part) for part in (kinds, opts) if part)
    return name + (f" ({inside})" if inside else "")


def _pm(mean, std, n) -> str:
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}") + f" ({n})"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 100 else f"{s:.0f} s"


def _machine_line(m: dict) -> str:
    mem = f", {m['memory_gb']:g} GB RAM" if m.get("memory_gb") else ""
    cpu = f", {m['processor']}" if m.get("processor") else ""
    cpu += f" ({m['cpu_capability']})" if m.get("cpu_capability") else ""
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
        if not row["best_fixed_p"]:
            return ""
        partial = "" if c["complete"] else f" (partial: {len(c['candidates'])} of {len(P_DEFAULT)} p)"
        return f", p={c['p']:g}{partial}"

    if rows:
        lines += table("mAP50:95", lambda row, c: _pm(c["map_mean"], c["map_std"], c["n"]) + best(row, c))
        lines += table("mAP50", lambda row, c: _pm(c["map50_mean"], c["map50_std"], c["n"]))
        lines += table("% of FP mAP50:95 (mean over seeds of mAP / FP mAP)",
                       lambda row, c: ("— (FP mAP 0)" if c["ratio_to_fp_mean"] is None
                                       else f"{100 * c['ratio_to_fp_mean']:.2f}") + best(row, c))
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
    if s["renamed"]:
        lines += [f"{len(s['renamed'])} cells were renamed after they ran, when the methods were (their "
                  "`renamed_from` and `migrated` in the JSON say from what and why): they are in the tables under "
                  "their new names" + ("; the suite's cells of their old names are other methods now."
                                       if s["suite"] in SUITES else "."), ""]
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
    shared = sum(1 for rec in _cells_of(results).values() if isinstance(rec, dict) and (rec.get("jobs") or 1) > 1)
    if shared:
        lines.append(f"{shared} cells ran beside other cells (`--jobs`, each with its share of the threads: their "
                     "`jobs` and `threads` in the JSON), so their wall times are those of a shared machine.")
    return "\n".join(lines).rstrip("\n") + "\n"
