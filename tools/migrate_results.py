"""Rename the committed benchmark cells after the reconstruction methods were renamed: re-runnable, idempotent.

What changed in the library, and what the cells made before it ran:

* ``brecq`` now names the published two-stage BRECQ (the rounding first, then the activation step sizes). The
  committed ``brecq`` cells learned the rounding and the step sizes together with every activation quantized: the
  method now called ``joint`` (bit-identical). Their keys ``brecq-...`` become ``joint-...``.
* ``qdrop`` and ``detptq-qdrop`` now toss one coin per element at a unit's input, as the reference code does. The
  committed cells ran the earlier "two-coin" scheme, still reachable as the ablation ``quantize --qdrop-input
  two-coin``: they get that option in ``cell.extra`` and ``+qdrop-input+two-coin`` in their key. A cell at
  ``--quant-prob 1`` tosses no coin (both schemes quantize every element), so it keeps its key.

A record is migrated only if it was made before the change: a ``brecq`` record whose ``config`` has no ``stages``,
a ``qdrop`` / ``detptq-qdrop`` record without ``--qdrop-input`` in its extra and without ``qdrop_input`` in its
``config`` (the new code records both). Running the script again changes nothing. A migrated record says
``renamed_from`` (the key it was made under: the report keeps it in the tables while that key is a cell of the
suite) and ``migrated`` (what was renamed and why); ``config`` stays as recorded, but for ``qdrop_input =
"two-coin"`` in the QDrop cells. Each file is rewritten atomically with its cells in the runner's order
(:func:`detptq_mini.benchmark.ordered_cells`), and the markdown next to it is regenerated
(:func:`detptq_mini.benchmark.to_markdown`). Every new key is checked to be ``Cell(**record["cell"]).key``.

Usage, from the repository root::

    python tools/migrate_results.py            # benchmarks/results/{full,ablations,loss-norm}.json and their .md
    python tools/migrate_results.py --check    # say what would change, write nothing (exit 1 if anything would)
    python tools/migrate_results.py FILE.json  # other result files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detptq_mini.benchmark import SUITES, Cell, load_results, ordered_cells, to_markdown
from detptq_mini.utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
#: The committed result files with reconstruction cells.
FILES = [ROOT / "benchmarks" / "results" / f"{name}.json" for name in ("full", "ablations", "loss-norm")]
#: The option that names QDrop's earlier input scheme, appended to the extra of a migrated QDrop cell.
TWO_COIN = ("--qdrop-input", "two-coin")
JOINT_NOTE = ("renamed from 'brecq' by tools/migrate_results.py: this cell learned the rounding and the step sizes "
              "together with every activation quantized, the method now called 'joint' ('brecq' is now the "
              "published two-stage BRECQ); its config is as recorded then")
TWO_COIN_NOTE = ("renamed by tools/migrate_results.py: this cell ran QDrop's earlier two-coin input scheme, now the "
                 "ablation '--qdrop-input two-coin' ('qdrop' and 'detptq-qdrop' now toss one coin per element at a "
                 "unit's input, as the reference code does); config.qdrop_input added, the rest as recorded then")


def _quant_prob_one(extra: list[str]) -> bool:
    """``--quant-prob 1`` (any spelling of 1) in a cell's extra arguments: no coin is tossed."""
    for flag, value in zip(extra, extra[1:]):
        if flag == "--quant-prob":
            try:
                return float(value) == 1.0
            except ValueError:
                return False
    return False


def migrate_record(key: str, rec: dict) -> tuple[str, dict] | None:
    """The new key and a migrated copy of one record, or None if the record needs no change.

    Raises:
        ValueError: the record's key is not that of its ``cell`` (before or after the change).
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("cell"), dict):
        return None
    cell = dict(rec["cell"])
    extra = list(cell.get("extra") or [])
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    method = cell.get("method")
    if method == "brecq" and "stages" not in config:
        new_method, new_extra, note = "joint", extra, JOINT_NOTE
    elif (method in ("qdrop", "detptq-qdrop") and TWO_COIN[0] not in extra and "qdrop_input" not in config
          and not _quant_prob_one(extra)):
        new_method, new_extra, note = method, [*extra, *TWO_COIN], TWO_COIN_NOTE
    else:
        return None
    old_cell = Cell(**{**cell, "extra": tuple(extra)})
    if old_cell.key != key:
        raise ValueError(f"record {key!r}: its cell's key is {old_cell.key!r}; not a file the runner wrote")
    new_cell = Cell(**{**cell, "method": new_method, "extra": tuple(new_extra)})
    new_key = new_cell.key
    expected = ("joint" + key[len("brecq"):] if new_method == "joint"
                else key + "+" + "+".join(a.lstrip("-") for a in TWO_COIN))
    assert new_key == expected, (key, new_key, expected)
    out = dict(rec)
    out["key"] = new_key
    out["cell"] = {**cell, "method": new_method, "extra": new_extra}
    if "method" in out:
        out["method"] = new_method
    if new_method != "joint":
        out["config"] = {**config, "qdrop_input": TWO_COIN[1]}
    out["renamed_from"] = key
    out["migrated"] = note
    assert Cell(**{**out["cell"], "extra": tuple(out["cell"]["extra"])}).key == new_key
    return new_key, out


def migrate_results(data: dict) -> tuple[dict, dict[str, str]]:
    """A result file's content with its records migrated (:func:`migrate_record`), its cells in the runner's order,
    and the renames ``{old key: new key}`` (empty: nothing to do; the content is then returned as it is).

    Raises:
        ValueError: a new key is already a key of the file (two records would be one).
    """
    cells, renames = {}, {}
    for key, rec in data["cells"].items():
        moved = migrate_record(key, rec)
        if moved is None:
            cells[key] = rec
        else:
            renames[key], rec = moved
            cells[renames[key]] = rec
    clash = sorted(set(renames.values()) & (set(data["cells"]) - set(renames)))
    if clash or len(cells) != len(data["cells"]):
        raise ValueError(f"the new keys {clash} are already in the file; move those records away first")
    if not renames:
        return data, {}
    order = [c.key for c in SUITES[data["suite"]]] if data["suite"] in SUITES else list(data["cells"])
    if data["suite"] not in SUITES:  # a custom file: each record where it was
        order = [renames.get(k, k) for k in order]
    return {**data, "cells": ordered_cells(cells, order)}, renames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: full, ablations, loss-norm)")
    parser.add_argument("--check", action="store_true", help="say what would change and write nothing")
    args = parser.parse_args(argv)
    pending = False
    for path in args.files or FILES:
        try:
            data = load_results(path, "file")
            if data is None:
                raise ValueError(f"file={str(path)!r} does not exist")
            new, renames = migrate_results(data)
        except ValueError as e:
            print(f"migrate_results: error: {e}", file=sys.stderr)
            return 2
        md_path = path.with_suffix(".md")
        md = to_markdown(new)
        stale_md = not md_path.exists() or md_path.read_text() != md
        print(f"{path}: {len(renames)} cells renamed" + ("" if renames else " (already migrated)")
              + (", markdown regenerated" if stale_md and not args.check else ", markdown out of date" if stale_md
                 else ""))
        for old, key in renames.items():
            print(f"  {old} -> {key}")
        pending = pending or bool(renames) or stale_md
        if args.check:
            continue
        if renames:
            atomic_write_json(path, new)
            assert json.loads(path.read_text()) == new
        if stale_md:
            atomic_write_text(md_path, md)
    return 1 if args.check and pending else 0


if __name__ == "__main__":
    sys.exit(main())
