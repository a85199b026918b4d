"""The figures and tables the chapters show; every ``plot_*`` function returns a matplotlib Figure (nothing is
drawn on import). :class:`Table` shows rows as an HTML table, :func:`smallest_text_px` checks that a figure's
text stays legible in the book, and :func:`strip_cdn_links` makes an animation's HTML player work offline.

The book's column is :data:`COLUMN_PX` pixels wide at a 1280 px window: a wider figure is shrunk to it, and
its text with it. A figure is legible when :func:`smallest_text_px` is at least :data:`MIN_TEXT_PX`; the
``plot_*`` functions draw at most three panels a row, sized for that.
"""

from __future__ import annotations

import html
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.text import Text

from .checks import check_int, check_number
from .model import UnitDetector
from .quant import QuantConfig, quant_layers, quantize_model

if TYPE_CHECKING:
    from .benchmark import Comparison

__all__ = [
    "CLASS_COLOURS", "COLUMN_PX", "MIN_TEXT_PX", "Table", "smallest_text_px", "draw_boxes", "plot_samples",
    "plot_detections", "unit_edges", "plot_units", "summary_table", "plot_ratio_vs_bits", "plot_ratio_vs_p",
    "plot_unit_losses", "cell_text", "cells_table", "comparison_table", "plot_ratio_vs_setting",
    "plot_reconstruction_flow", "strip_cdn_links", "table", "plot_selection_loop",
]

CLASS_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628")
#: Width in pixels of the book's content column (a code block, a figure) at a 1280 px browser window.
COLUMN_PX = 684
#: The smallest text height, in displayed pixels, that a figure of the book may have.
MIN_TEXT_PX = 9.0
#: Panels a row at most: wider grids shrink their text below :data:`MIN_TEXT_PX`.
MAX_COLS = 3


class Table:
    """Rows shown as a table: HTML in Jupyter and in the book, aligned text for ``print`` and ``repr``.

    Args:
        rows: one mapping per row, column name -> value (a missing key shows as an empty cell); or one sequence
            per row, in the order of ``columns``.
        columns: the columns, in order (default: the keys of the rows, in order of first appearance).
        formats: column -> a format spec (``".3f"``, ``",d"``) or a function of the value returning a string;
            other values are shown with ``str``. Numbers are right-aligned.
        caption: a caption shown above the table, if given.

    Example: ``Table([{"bits": "W8A8", "mAP": 0.886}], formats={"mAP": ".3f"})`` as the last line of a cell.
    """

    def __init__(self, rows: Sequence[Mapping | Sequence], columns: Sequence[str] | None = None,
                 formats: Mapping[str, str | Callable] | None = None, caption: str | None = None):
        rows = list(rows)
        if columns is None:
            if not all(isinstance(r, Mapping) for r in rows):
                raise ValueError("columns is needed when rows are sequences (it names their values in order)")
            columns = list(dict.fromkeys(k for r in rows for k in r))
        self.columns = [str(c) for c in columns]
        if not self.columns:
            raise ValueError("a table needs at least one column: rows are empty and no columns were given")
        formats = dict(formats or {})
        unknown = sorted(set(formats) - set(self.columns))
        if unknown:
            raise ValueError(f"formats has {unknown} that are not columns; allowed: {', '.join(self.columns)}")
        self.rows: list[list[tuple[str, bool]]] = []  # (text, numeric) per cell
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                row = list(row)
                if len(row) != len(self.columns):
                    raise ValueError(f"rows[{i}] has {len(row)} values for {len(self.columns)} columns")
                row = dict(zip(self.columns, row))
            self.rows.append([self._cell(row.get(c), formats.get(c)) for c in self.columns])
        self.caption = caption

    @classmethod
    def _from_cells(cls, columns: list[str], cells: list[list[tuple[str, bool]]], caption: str | None) -> "Table":
        """A table of cells already formatted, each ``(text, numeric)`` (what :func:`table` builds)."""
        t = cls.__new__(cls)
        t.columns, t.rows, t.caption = list(columns), cells, caption
        return t

    @staticmethod
    def _cell(value, fmt) -> tuple[str, bool]:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is None:
            return "", False
        if callable(fmt):
            return str(fmt(value)), numeric
        return (format(value, fmt) if fmt else str(value)), numeric

    def _repr_html_(self) -> str:
        def td(tag, text, numeric):
            align = ' style="text-align: right"' if numeric else ""
            return f"<{tag}{align}>{html.escape(text)}</{tag}>"

        head = "".join(td("th", c, all(r[j][1] for r in self.rows) and bool(self.rows))
                       for j, c in enumerate(self.columns))
        body = "".join("<tr>" + "".join(td("td", t, n) for t, n in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f'<table class="table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        widths = [max([len(c)] + [len(r[j][0]) for r in self.rows]) for j, c in enumerate(self.columns)]

        def line(cells, numeric):
            return "  ".join(t.rjust(w) if n else t.ljust(w) for t, n, w in zip(cells, numeric, widths)).rstrip()

        numeric = [bool(self.rows) and all(r[j][1] for r in self.rows) for j in range(len(self.columns))]
        out = [self.caption] if self.caption else []
        out.append(line(self.columns, numeric))
        out += [line([t for t, _ in r], [n for _, n in r]) for r in self.rows]
        return "\n".join(out)


def smallest_text_px(fig: Figure, column_px: float = COLUMN_PX) -> float:
    """The height in displayed pixels of the smallest text of ``fig``, shown in a column ``column_px`` wide.

    A notebook stores a figure at its ``dpi`` cropped to its content (``bbox_inches="tight"``); the book shows
    it at that size, or shrunk to the column if it is wider. A text of ``s`` points then displays at
    ``s * dpi / 72 * min(1, column_px / width_px)`` pixels. Only visible, non-empty texts count (tick labels,
    titles, legends, annotations). Returns ``inf`` for a figure without text.
    """
    column_px = check_number("column_px", column_px, 0, low_open=True)
    # a figure that was shown is closed, its canvas a bare FigureCanvasBase: draw it on an Agg canvas
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    width_px = fig.get_tightbbox(renderer).width * fig.dpi
    shrink = min(1.0, column_px / width_px) if width_px > 0 else 1.0
    sizes = [t.get_fontsize() for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.get_window_extent(renderer).width > 0]
    return min(sizes) * fig.dpi / 72 * shrink if sizes else float("inf")


def draw_boxes(ax, boxes, labels, class_names, scores=None, dashed: bool = False) -> None:
    """Draw xyxy ``boxes`` on ``ax``, coloured by label, with the class name (and score) as a tag."""
    for i, (box, lab) in enumerate(zip(torch.as_tensor(boxes).tolist(), torch.as_tensor(labels).tolist())):
        x1, y1, x2, y2 = box
        colour = CLASS_COLOURS[lab % len(CLASS_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=colour, ls="--" if dashed else "-"))
        tag = class_names[lab] if scores is None else f"{class_names[lab]} {float(scores[i]):.2f}"
        ax.text(x1, y1 - 1, tag, color="white", fontsize=7, va="bottom", bbox=dict(fc=colour, ec="none", pad=0.5))


def _grid(n: int, cols: int, size: float = 2.2) -> tuple[Figure, list]:
    """``n`` panels, ``cols`` (at most :data:`MAX_COLS`) a row, each ``size`` inches square, axes off."""
    cols = check_int("cols", cols, 1, MAX_COLS, hint="(more panels a row shrink their text below legibility)")
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_samples(dataset, n: int = 6, cols: int = 3) -> Figure:
    """The first ``n`` images of a :class:`~detptq_mini.data.ShapesDataset` with their ground-truth boxes."""
    fig, axes = _grid(n, cols)
    for i, ax in zip(range(n), axes):
        img, t = dataset[i]
        ax.imshow(img.permute(1, 2, 0).numpy())
        draw_boxes(ax, t["boxes"], t["labels"], dataset.class_names)
        ax.set_title(f"{dataset.split} #{i}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_detections(images: torch.Tensor, detections: list[dict], class_names, targets: list[dict] | None = None,
                    score_thresh: float = 0.3, cols: int = 3, titles: list[str] | None = None) -> Figure:
    """Detections above ``score_thresh`` (solid) over ground truth (dashed, if given), one panel per image."""
    fig, axes = _grid(len(images), cols)
    for i, ax in enumerate(axes[: len(images)]):
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        if targets is not None:
            draw_boxes(ax, targets[i]["boxes"], targets[i]["labels"], class_names, dashed=True)
        d = detections[i]
        keep = d["scores"] > score_thresh
        draw_boxes(ax, d["boxes"][keep], d["labels"][keep], class_names, scores=d["scores"][keep])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def unit_edges(model: UnitDetector) -> list[tuple[str, str]]:
    """Every ``(producer, consumer)`` pair of a detector's units, one per tensor a unit reads, in forward order.

    The producer is the unit that writes the tensor, or ``"image"`` for the network's input. A unit that reads
    two tensors (a concatenation of a skip connection) has two edges.
    """
    if not isinstance(model, UnitDetector):
        raise ValueError(f"model must be a UnitDetector (it names its units), got {type(model).__name__}")
    writer = {"image": "image"}
    edges = []
    for u in model.units:
        edges += [(writer[n], u.name) for n in u.inputs]
        writer[u.output] = u.name
    return edges


def _unit_layout(model: UnitDetector) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Columns (the first part of the unit names, in order) and each unit's ``(column, row)``.

    Units go down their column in forward order; a unit fed from an earlier column starts no higher than the
    highest unit it reads from there, so that skip connections run across or down, never far up.
    """
    groups = list(dict.fromkeys(u.name.split(".")[0] for u in model.units))
    writer = {"image": "image"}
    place: dict[str, tuple[int, int]] = {"image": (0, 0)}
    last_row = {g: 0 for g in groups}  # the image box takes row 0 of the first column
    for u in model.units:
        col = groups.index(u.name.split(".")[0])
        row = last_row[groups[col]] + 1 if last_row[groups[col]] or col == 0 else 0
        fed = [place[writer[n]][1] for n in u.inputs if place[writer[n]][0] < col]
        if fed:
            row = max(row, min(fed))
        place[u.name] = (col, row)
        last_row[groups[col]] = row
        writer[u.output] = u.name
    return groups, place


def _bits_label(bits: list[str]) -> str:
    """``["W4A4", "W4A4", "W8A8"]`` -> ``"W4A4 x2, W8A8"``: a unit's convs by their bit widths."""
    counts = dict.fromkeys(bits, 0)
    for b in bits:
        counts[b] += 1
    return ", ".join(b if k == 1 else f"{b} x{k}" for b, k in counts.items())


def plot_units(model: UnitDetector, config: QuantConfig | None = None) -> Figure:
    """The detector's units as boxes and the tensors they pass as arrows, with where the quantizers sit.

    One box per unit (its name without the column's prefix, then the bit widths of its convs), one arrow per
    edge of :func:`unit_edges`, the columns in the order of the unit names' first parts (``backbone``,
    ``neck``, ``head``). The bits come from the model that :func:`~detptq_mini.quant.quantize_model` builds
    with ``config`` (default ``QuantConfig()``, W4A4 with the protocol ``"ours"``): every conv's weights and
    input activation are fake-quantized, so a quantizer sits at the input of every conv; a conv the protocol
    leaves in FP is marked ``FP``. Boxes are coloured by what their convs get: the low bit width, W8A8 (the
    stem; the head units' prediction conv), or FP. Everything between convs (SiLU, adds, concatenations,
    upsampling, pooling) is not quantized.
    """
    if not isinstance(model, UnitDetector):
        raise ValueError(f"model must be a UnitDetector (it names its units), got {type(model).__name__}")
    config = QuantConfig() if config is None else config
    layers = quant_layers(quantize_model(model, config))
    bits: dict[str, list[str]] = {u: [] for u in model.unit_names}
    for conv in model.conv_names():
        key = conv if conv in layers else conv.removesuffix(".conv")
        layer = layers.get(key)
        bits[model.unit_of(conv)].append("FP" if layer is None else f"W{layer.weight_quantizer.bits}A{layer.input_quantizer.bits}")
    low = f"W{config.w_bits}A{config.a_bits}"
    fills = {"low": "#c6dbef", "mixed": "#dadaeb", "eight": "#fdd0a2", "fp": "#e5e5e5"}

    def kind(b: list[str]) -> str:
        if set(b) == {"FP"}:
            return "fp"
        if low in b:
            return "low" if set(b) == {low} else "mixed"
        return "eight"

    groups, place = _unit_layout(model)
    rows = max(r for _, r in place.values()) + 1
    fig, ax = plt.subplots(figsize=(6.6, 0.5 * rows + 1.0))
    w, h, dx = 0.78, 0.62, 1.15  # box width and height, column pitch (data units; one row is 1)
    centre = {n: (c * dx, -r) for n, (c, r) in place.items()}
    for c, g in enumerate(groups):
        ax.text(c * dx, 0.9, g, ha="center", va="bottom", fontsize=10, fontweight="bold")
    for name, (x, y) in centre.items():
        if name == "image":
            label, fill, gid = "image", "white", "input"
        else:
            label = f"{name.split('.', 1)[-1]}\n{_bits_label(bits[name])}"
            fill, gid = fills[kind(bits[name])], f"unit:{name}"
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", fc=fill,
                                    ec="#333333", lw=0.8, gid=gid))
        ax.text(x, y, label, ha="center", va="center", fontsize=7.5, linespacing=1.1)
    for src, dst in unit_edges(model):
        (xa, ya), (xb, yb) = centre[src], centre[dst]
        if xa == xb and ya - yb == 1:  # the next unit in the column: straight down
            a, b, style = (xa, ya - h / 2), (xb, yb + h / 2), "arc3"
        elif xa == xb:  # a skip connection inside a column: around the boxes' right side
            a, b, style = (xa + w / 2, ya), (xb + w / 2, yb), "arc3,rad=-0.35"
        else:  # to a later column: from the right side to the left side
            a, b, style = (xa + w / 2, ya), (xb - w / 2, yb), "arc3"
        ax.add_patch(FancyArrowPatch(a, b, connectionstyle=style, arrowstyle="-|>", mutation_scale=8, lw=0.8,
                                     color="#555555", shrinkA=1, shrinkB=1, gid=f"edge:{src}->{dst}"))
    names = {"low": f"{low} convs", "mixed": f"{low} convs and a W8A8 one", "eight": "W8A8 convs",
             "fp": "FP convs (not quantized)"}
    shown = dict.fromkeys(kind(b) for b in bits.values())
    legend = [Rectangle((0, 0), 1, 1, fc=fills[k], ec="#333333", label=names[k]) for k in shown]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    ax.set_xlim(-w / 2 - 0.1, (len(groups) - 1) * dx + w / 2 + 0.35)
    ax.set_ylim(-rows + 0.4, 1.4)
    ax.set_aspect("auto")
    ax.axis("off")
    ax.set_title(f"{len(model.units)} units, protocol {config.protocol!r}: every quantized conv "
                 "fake-quantizes its input and weights", fontsize=8.5)
    fig.tight_layout()
    return fig


def summary_table(summary: dict, labels: Sequence[str], bits: Sequence[str] | None = None, pct: bool = False,
                  caption: str | None = None) -> Table:
    """A benchmark table: a row per method, a column per bits, each entry the mean over calibration seeds.

    Args:
        summary: :func:`~detptq_mini.benchmark.report.summarize` of a result file.
        labels: the rows, by their ``label``, in the order shown; each must be a row of ``summary``.
        bits: the columns (default: every bits of ``summary``, widest first).
        pct: entries as % of the FP mAP50:95 (``"92.3 % (3)"``) instead of mAP50:95 with the sample standard
            deviation (``"0.819 ± 0.004 (3)"``); the number of seeds is in parentheses.
        caption: shown above the table.

    A row with no cell done at some bits shows "—" there.
    """
    rows = {row["label"]: row for row in summary["rows"]}
    missing = [lab for lab in labels if lab not in rows]
    if missing:
        raise ValueError(f"labels: {missing!r} are not rows of the summary; allowed: {sorted(rows)!r}")
    bits = list(summary["bits"] if bits is None else bits)
    unknown = [b for b in bits if b not in summary["bits"]]
    if unknown:
        raise ValueError(f"bits: {unknown!r} are not columns of the summary; allowed: {summary['bits']!r}")

    return Table([{"method": lab, **{b: cell_text(rows[lab]["cells"].get(b), pct) for b in bits}} for lab in labels],
                 columns=["method", *bits], caption=caption)


def cell_text(cell: dict | None, pct: bool = False, std: bool | None = None) -> str:
    """One table entry for a cell of :func:`~detptq_mini.benchmark.report.summarize`: its mean over calibration seeds.

    Args:
        cell: a row's cell (``row["cells"][bits]``), or None for a cell not done ("—").
        pct: as % of the FP mAP50:95 (``"92.3 % (3)"``) instead of mAP50:95 (``"0.819 ± 0.004 (3)"``).
        std: show the sample standard deviation over seeds (in the entry's unit); default: only with ``pct`` off.
            A cell of one seed has none to show.

    The number of seeds is in parentheses.
    """
    if cell is None:
        return "—"
    if not isinstance(cell, Mapping) or "map_mean" not in cell or "n" not in cell:
        raise ValueError(f"cell must be a cell of summarize()'s rows (with 'n' and 'map_mean') or None, got {cell!r:.80}")
    std = (not pct) if std is None else std
    spread = std and cell["map_std"] is not None
    if pct:
        if cell["ratio_to_fp_mean"] is None:
            return f"— (FP mAP 0) ({cell['n']})"
        err = f" ± {_pct_err(cell):.1f}" if spread else ""
        return f"{100 * cell['ratio_to_fp_mean']:.1f}{err} % ({cell['n']})"
    err = f" ± {cell['map_std']:.3f}" if spread else ""
    return f"{cell['map_mean']:.3f}{err} ({cell['n']})"


def cells_table(rows: Mapping[str, Mapping[str, dict | None]], pct: bool = True, std: bool = True,
                first: str = "method", caption: str | None = None) -> Table:
    """A table of summary cells picked by hand: a row per name, a column per key of its mapping.

    Where :func:`summary_table` lays out one summary's rows by bits, this one takes any cells (from several
    result files, or one bits column split by protocol): ``{"joint": {"ours": cell, "head FP": cell}, ...}``.

    Args:
        rows: row name -> {column -> a cell of :func:`~detptq_mini.benchmark.report.summarize`, or None for "—"}.
        pct, std: how each entry is written (:func:`cell_text`); by default % of FP with its standard deviation.
        first: the header of the row names' column.
        caption: shown above the table.
    """
    if not rows:
        raise ValueError("rows is empty: give at least one row name -> {column: cell}")
    for name, cols in rows.items():
        if not isinstance(cols, Mapping):
            raise ValueError(f"rows[{name!r}] must map a column name to a cell, got {type(cols).__name__}")
    # columns are shown by their text: a keep probability 0.5 is the column "0.5"
    columns = list(dict.fromkeys(str(c) for cols in rows.values() for c in cols))
    if str(first) in columns:
        raise ValueError(f"first={first!r} is also a column of rows; give the row names' column another header")
    out = []
    for name, cols in rows.items():
        texts = {str(c): cell_text(cell, pct, std) for c, cell in cols.items()}
        out.append({str(first): name, **{c: texts.get(c, "—") for c in columns}})
    return Table(out, columns=[str(first), *columns], caption=caption)


#: The words of a :class:`detptq_mini.benchmark.Comparison`'s verdict in a table.
_VERDICT_WORDS = {"a": "A ahead", "b": "B ahead", "noise": "within noise", "one seed": "one seed: no verdict"}


def comparison_table(rows: Sequence[tuple[str, str, "Comparison"]], caption: str | None = None) -> Table:
    """The book's verdicts as a table: for each pair, A's mean minus B's, the bar it must clear, and the verdict.

    Args:
        rows: ``(name A, name B, compare(cell A, cell B))`` per row, where ``compare`` is
            :func:`~detptq_mini.benchmark.report.compare` (mAP50:95 over calibration seeds).
        caption: shown above the table.

    "A ahead" or "B ahead" when the gap exceeds ``k`` (the book: 2) pooled standard deviations of the seeds,
    "within noise" otherwise, "one seed: no verdict" when neither side has a spread.
    """
    if not rows:
        raise ValueError("rows is empty: give (name A, name B, compare(a, b)) per row")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) != 3 or not hasattr(row[2], "verdict"):
            raise ValueError(f"rows[{i}] must be (name A, name B, compare(a, b)), got {row!r:.80}")
        name_a, name_b, v = row
        out.append({"A": name_a, "B": name_b, "A - B": v.gap,
                    "bar": None if v.pooled_std is None else v.k * v.pooled_std,
                    "seeds": f"{v.n_a}/{v.n_b}", "verdict": _VERDICT_WORDS[v.verdict]})
    return Table(out, formats={"A - B": "+.4f", "bar": ".4f"}, caption=caption)


#: Line styles and markers that tell series apart beside their colours (for readers who do not see colours alike).
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _pct_err(cell: dict) -> float:
    """The error bar of a summary cell's % of FP: the FP mAP is one number, so the ratio's std over seeds is the
    mAP's std over the FP mAP (0 for one seed)."""
    if cell["map_std"] is None or not cell["map_mean"]:  # one seed, or every seed at mAP 0 (no spread)
        return 0.0
    return 100 * cell["ratio_to_fp_mean"] * cell["map_std"] / cell["map_mean"]


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n > 1 else ''}"


def _seeds_range(ns: Sequence[int]) -> str:
    """The seed counts of a line's points, sorted: "3 seeds", or "1-3 seeds" when they differ."""
    return _seeds(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]} seeds"


def plot_ratio_vs_bits(summary: dict, labels: list[str] | None = None, title: str | None = None) -> Figure:
    """Percent of the FP mAP50:95 against bits, one line per method: the picture of a benchmark table.

    Args:
        summary: :func:`~detptq_mini.benchmark.report.summarize` of a result file.
        labels: the rows to draw, by their ``label`` (default: every row); each must be a row of ``summary``.
        title: the axes title.

    A point is the mean over calibration seeds; its error bar is the sample standard deviation over seeds (none
    for one seed), and the number of seeds is marked where it is below the row's largest. Bits go from the widest
    (left) to the narrowest (right); a row without a cell at some bits has no point there.
    """
    rows = {row["label"]: row for row in summary["rows"]}
    labels = list(rows) if labels is None else list(labels)
    missing = [lab for lab in labels if lab not in rows]
    if missing:
        raise ValueError(f"labels: {missing!r} are not rows of the summary; allowed: {sorted(rows)!r}")
    bits = summary["bits"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, lab in enumerate(labels):
        cells = rows[lab]["cells"]
        xs = [j for j, b in enumerate(bits) if b in cells and cells[b]["ratio_to_fp_mean"] is not None]
        if not xs:  # no cell, or only cells of a model whose FP mAP is 0 (no % of FP)
            continue
        ys = [100 * cells[bits[j]]["ratio_to_fp_mean"] for j in xs]
        errs = [_pct_err(cells[bits[j]]) for j in xs]
        dx = (i - (len(labels) - 1) / 2) * 0.04  # a small offset keeps overlapping error bars apart
        line = ax.errorbar([x + dx for x in xs], ys, yerr=errs, marker=_MARKERS[i % len(_MARKERS)], ms=4, capsize=3,
                           ls=_LINESTYLES[i % len(_LINESTYLES)], label=lab)
        most = max(cells[bits[j]]["n"] for j in xs)
        for x, y, j in zip(xs, ys, xs):
            if cells[bits[j]]["n"] < most:
                ax.annotate(f"n={cells[bits[j]]['n']}", (x + dx, y), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=line[0].get_color())
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(bits)), bits)
    ax.set_xlabel("bits (weights / activations)")
    ax.set_ylabel("% of FP mAP50:95")
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


#: Line styles and markers cycled with the colours, so that series stay apart in grey print and for colour-blind readers.
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"))


_LP_ROW = re.compile(r"Lp p=(\d+(?:\.\d+)?)$")


def plot_ratio_vs_p(summaries: Mapping[str, dict], bits: str, reference: str | None = "DetPTQ simple",
                    title: str | None = None) -> Figure:
    """Percent of the FP mAP50:95 against the fixed p of the Lp search, one line per model: the paper's motivation
    (the best single p depends on the model and the bits) as a picture.

    Args:
        summaries: model name -> :func:`~detptq_mini.benchmark.report.summarize` of its result file.
        bits: the bits to draw, e.g. ``"W4A4"``; each summary must have cells at them.
        reference: a row drawn as a dashed horizontal line in its model's colour (DetPTQ's per-layer p by default),
            or None; a model without that row at ``bits`` gets no line.
        title: the axes title.

    A point is a row labelled ``Lp p=<p>``: the mean over calibration seeds, with the sample standard deviation as
    its error bar (none for one seed); the line is solid and the best p is circled. The reference is dashed.
    """
    if not summaries:
        raise ValueError("summaries: give at least one model name -> summary")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, summary) in enumerate(summaries.items()):
        if bits not in summary["bits"]:
            plt.close(fig)
            raise ValueError(f"bits={bits!r} has no cells in {name!r}; allowed: {summary['bits']!r}")
        rows = {row["label"]: row for row in summary["rows"]}
        pts = sorted((float(m.group(1)), row["cells"][bits]) for lab, row in rows.items()
                     if (m := _LP_ROW.match(lab)) and bits in row["cells"]
                     and row["cells"][bits]["ratio_to_fp_mean"] is not None)
        if not pts:
            plt.close(fig)
            raise ValueError(f"summaries[{name!r}] has no 'Lp p=...' row with a cell at {bits} (and an FP mAP above 0)")
        xs = [p for p, _ in pts]
        ys = [100 * c["ratio_to_fp_mean"] for _, c in pts]
        errs = [_pct_err(c) for _, c in pts]
        n = sorted({c["n"] for _, c in pts})
        seeds = _seeds_range(n)
        colour, marker = f"C{i % 10}", _MARKERS[i % len(_MARKERS)]  # solid lines: the dashed ones are references
        ax.errorbar(xs, ys, yerr=errs, marker=marker, ms=4, capsize=3, color=colour,
                    label=f"{name}: Lp, fixed p ({seeds})")
        best = max(range(len(xs)), key=ys.__getitem__)
        ax.plot([xs[best]], [ys[best]], marker="o", ms=11, mfc="none", mec=colour, ls="none")
        ref = rows.get(reference, {}).get("cells", {}).get(bits) if reference else None
        if ref is not None and ref["ratio_to_fp_mean"] is not None:
            ax.axhline(100 * ref["ratio_to_fp_mean"], color=colour, ls="--", lw=1.2,
                       label=f"{name}: {reference} ({_seeds(ref['n'])})")
    ax.set_xlabel("p of the Lp scale search (one p for every layer)")
    ax.set_ylabel(f"% of FP mAP50:95 at {bits}")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_ratio_vs_setting(series: Mapping[str, Mapping[float, dict]], xlabel: str, title: str | None = None,
                          reference: tuple[str, dict] | None = None) -> Figure:
    """Percent of the FP mAP50:95 against one numeric setting of a method (QDrop's keep probability, a learning
    rate, a budget), one line per series.

    Args:
        series: series name -> {setting value -> a cell of :func:`~detptq_mini.benchmark.report.summarize`}.
        xlabel: what the setting is.
        title: the axes title.
        reference: ``(name, cell)`` drawn as a dotted horizontal line (e.g. another protocol's best), or None.

    A point is the mean over calibration seeds with the sample standard deviation as its error bar (none for one
    seed); series differ in colour, line style and marker.
    """
    if not series:
        raise ValueError("series is empty: give at least one name -> {setting: cell}")
    for name, points in series.items():
        if not isinstance(points, Mapping):
            raise ValueError(f"series[{name!r}] must map a setting (a number) to a cell, got {type(points).__name__}")
        bad = [x for x in points if isinstance(x, bool) or not isinstance(x, numbers.Real)]
        if bad:
            raise ValueError(f"series[{name!r}] has settings that are not numbers: {bad!r}")
    if reference is not None and (not isinstance(reference, (tuple, list)) or len(reference) != 2
                                  or not isinstance(reference[1], Mapping)):
        raise ValueError(f"reference must be (name, cell) or None, got {reference!r:.80}")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, points) in enumerate(series.items()):
        pts = sorted((float(x), c) for x, c in points.items() if c is not None and c["ratio_to_fp_mean"] is not None)
        if not pts:
            plt.close(fig)
            raise ValueError(f"series[{name!r}] has no cell with a % of FP to draw")
        n = sorted({c["n"] for _, c in pts})
        seeds = _seeds_range(n)
        ls, marker = _STYLES[i % len(_STYLES)]
        ax.errorbar([x for x, _ in pts], [100 * c["ratio_to_fp_mean"] for _, c in pts],
                    yerr=[_pct_err(c) for _, c in pts], ls=ls, marker=marker, ms=5, capsize=3, color=f"C{i % 10}",
                    label=f"{name} ({seeds})")
    if reference is not None:
        name, cell = reference
        ax.axhline(100 * cell["ratio_to_fp_mean"], color="grey", ls=(0, (1, 4)), lw=1.5,  # no series' style
                   label=f"{name} ({_seeds(cell['n'])})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("% of FP mAP50:95")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_unit_losses(profiles: dict[str, dict[str, float]], title: str | None = None, log: bool = True) -> Figure:
    """Per-unit losses after reconstruction, one line per method: where along the network a method loses.

    Args:
        profiles: ``{label: {unit: loss}}``, e.g. :func:`~detptq_mini.benchmark.report.unit_losses` of each
            method's cells; each profile's units in forward order. The x axis is every unit of any profile; a
            profile without a unit (e.g. the head left in FP) has a gap there.
        title: the axes title.
        log: a logarithmic loss axis (the losses grow by orders of magnitude along the network).
    """
    if not profiles:
        raise ValueError("profiles is empty: give {label: {unit: loss}}")
    units: list[str] = []
    for prof in profiles.values():
        units += [u for u in prof if u not in units]
    for label, prof in profiles.items():
        where = [units.index(u) for u in prof]
        if where != sorted(where):
            raise ValueError(f"profiles[{label!r}] has its units in another order than the profiles before it: "
                             "give every profile's units in forward order")
    fig, ax = plt.subplots(figsize=(6.8, 3.9))
    for i, (label, prof) in enumerate(profiles.items()):
        ls, marker = _STYLES[i % len(_STYLES)]
        ax.plot(range(len(units)), [prof.get(u, float("nan")) for u in units], ls=ls, marker=marker, ms=4, lw=1.3, label=label,
                color=f"C{i % 10}")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(units)), units, rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("loss at the unit's output")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _box(ax, xy, w: float, h: float, text: str, fc: str, fs: float = 9, ls: str = "-") -> None:
    x, y = xy
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=fc, ec="#333333", lw=1.2, ls=ls))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs)


def _arrow(ax, a, b, text: str | None = None, ls: str = "-", color: str = "#333333", rad: float = 0.0,
           off=(0.0, 0.12), fs: float = 8) -> None:
    ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="-|>", lw=1.2, color=color, ls=ls, shrinkA=2,
                                                    shrinkB=2, connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((a[0] + b[0]) / 2 + off[0], (a[1] + b[1]) / 2 + off[1], text, ha="center", va="center",
                fontsize=fs, color=color)


def plot_reconstruction_flow() -> Figure:
    """A diagram of one unit's reconstruction: the three cached tensors, QDrop's coin at the unit's input, the
    loss against the FP output and the gradients to the rounding and the step sizes (method page, section 6)."""
    fig, ax = plt.subplots(figsize=(6.8, 3.9))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 5.6)
    ax.axis("off")
    fp, qc, cache, coin, loss = "#dbe9f6", "#fde3cf", "#eeeeee", "#fff2b3", "#e2f0d9"
    _box(ax, (1.1, 2.8), 1.8, 0.8, "calibration\nimages", cache)
    _box(ax, (3.4, 4.6), 2.3, 0.8, "FP prefix\n(units before k)", fp)
    _box(ax, (3.4, 1.0), 2.5, 0.8, "quantized prefix\n(already reconstructed)", qc)
    _arrow(ax, (1.6, 3.2), (2.25, 4.45))
    _arrow(ax, (1.6, 2.4), (2.15, 1.15))
    for y, name in ((4.6, "$x_{fp}$"), (1.0, "$x_q$")):
        _box(ax, (5.5, y), 0.9, 0.6, name, cache, ls="--")
        _arrow(ax, (4.65, y), (5.05, y))
    _box(ax, (7.7, 4.6), 1.6, 0.7, "FP unit k", fp)
    _box(ax, (9.4, 4.6), 0.9, 0.6, "$y_{fp}$", cache, ls="--")
    _arrow(ax, (5.95, 4.6), (6.9, 4.6))
    _arrow(ax, (8.5, 4.6), (8.95, 4.6))
    _box(ax, (5.5, 2.8), 1.8, 0.85, "coin per element:\nkeep $x_q$ (quant_prob)\nor drop to $x_{fp}$", coin, fs=8)
    _arrow(ax, (5.5, 4.3), (5.5, 3.22))
    _arrow(ax, (5.5, 1.3), (5.5, 2.38))
    _box(ax, (7.7, 2.8), 1.75, 1.0, "quantized unit k\nrounding $V$,\nstep sizes $s$", qc)
    _arrow(ax, (6.4, 2.8), (6.82, 2.8))
    _box(ax, (9.4, 2.8), 1.1, 0.9, "$L_p$ loss\n+ rounding\nregulariser", loss, fs=8)
    _arrow(ax, (8.58, 2.8), (8.85, 2.8))
    _arrow(ax, (9.4, 4.3), (9.4, 3.25))
    _arrow(ax, (9.4, 2.35), (7.95, 2.3), "gradients to $V$ and $s$", ls="--", color="#b2182b", rad=-0.5,
           off=(0.3, -0.85))
    ax.text(5.5, 0.25, "dashed: cached once per unit", ha="center", fontsize=8, color="#555555")
    fig.tight_layout()
    return fig


#: A ``<link ...>`` tag whose ``href`` is on another host (``http://``, ``https://`` or ``//``), however its
#: attributes are wrapped over lines, with the blanks and the one line break after it.
_REMOTE_LINK = re.compile(r"""<link\b[^>]*?\bhref\s*=\s*["']?(?:https?:)?//[^>]*>[ \t]*\n?""",
                          re.IGNORECASE | re.DOTALL)


def strip_cdn_links(html: str) -> str:
    """``html`` without its ``<link>`` tags to other hosts, so that a page showing it needs no network.

    Matplotlib's animation player (``FuncAnimation.to_jshtml``) links an icon stylesheet from a CDN, in a tag
    written over two lines; the player's buttons work without it. The whole tag goes, however it is wrapped
    (a filter by lines would leave its ``href=...>`` line behind as text); everything else, a local
    ``<link>`` included, is kept byte for byte.
    """
    return _REMOTE_LINK.sub("", html)


# ------------------------------------------------------------------ tables
def table(rows, columns, index=None, index_name: str = "", fmt: str = ".3f", title: str | None = None) -> Table:
    """A :class:`Table` of ``rows`` under ``columns``, every number formatted alike: how the chapters show a result.

    Args:
        rows: a sequence of rows, each a sequence with one value per column (real numbers are formatted with
            ``fmt``, integers and anything else with ``str``, None shows as an em dash).
        columns: the column headers, one per value of a row.
        index: the row labels shown as a first column (one per row), or None for no label column.
        index_name: the header of the label column.
        fmt: the format spec of numbers, e.g. ``".3f"`` or ``".1%"``.
        title: a caption above the table.

    Returns:
        A :class:`Table`; a notebook displays it as an HTML table. A column whose values are all numbers (or None)
        is right-aligned.

    Raises:
        ValueError: ``columns`` empty, a row with another number of values than ``columns``, ``index`` of
            another length than ``rows``, or ``fmt`` not a format spec for numbers.
    """
    columns = [str(c) for c in columns]
    if not columns:
        raise ValueError("columns is empty: give at least one column header")
    rows = [list(r) for r in rows]
    for i, r in enumerate(rows):
        if len(r) != len(columns):
            raise ValueError(f"rows[{i}] has {len(r)} values but columns has {len(columns)}: {columns!r}")
    if index is not None:
        index = [str(x) for x in index]
        if len(index) != len(rows):
            raise ValueError(f"index has {len(index)} labels but there are {len(rows)} rows")
    try:
        format(1.0, fmt)
    except (ValueError, TypeError):
        raise ValueError(f"fmt={fmt!r} is not a format spec for numbers, e.g. '.3f'") from None

    def real(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    def text(v) -> str:
        if v is None:
            return "\u2014"
        return format(float(v), fmt) if real(v) and not isinstance(v, numbers.Integral) else str(v)

    numeric = [all(v is None or real(v) for v in col) and any(v is not None for v in col) for col in zip(*rows)]
    cells = [[(text(v), num) for v, num in zip(r, numeric)] for r in rows]
    if index is not None:
        columns = [str(index_name), *columns]
        cells = [[(label, False), *row] for label, row in zip(index, cells)]
    return Table._from_cells(columns, cells, title)


# ------------------------------------------------------------------ DetPTQ's selection loop
#: The steps of :func:`plot_selection_loop`: ``key: (x, y, text)`` in axes fractions.
_SELECTION_STEPS = {
    "calib": (0.13, 0.86, "calibration images $D$\n(no labels)"),
    "fp": (0.13, 0.56, "FP detector $f$\n(every quantizer off)"),
    "target": (0.13, 0.24, "FP outputs $f(D)$\n(dense, pre-NMS;\ncomputed once)"),
    "layer": (0.50, 0.90, "for each layer $l$, in forward order"),
    "p": (0.50, 0.73, "for each $p$ in $P = \\{1, 1.5, \\ldots, 4.5\\}$"),
    "set": (0.50, 0.53, "$l$ at $s^*_{l,p}$; earlier layers at their $p^*$;\nlater layers FP (rest)"),
    "run": (0.50, 0.33, "run the detector from $l$'s unit\n(the prefix is cached)"),
    "odol": (0.50, 0.13, "ODOL$(f(D),\\ \\hat f(D))$, KL + L1"),
    "keep": (0.86, 0.50, "all $p$ tried: keep\n$p^*_l = \\arg\\min_p$ ODOL;\nfix $l$ at $s^*_{l,p^*_l}$"),
}
#: The arrows: ``(from, to, label)``.
_SELECTION_ARROWS = (
    ("calib", "fp", ""), ("fp", "target", ""), ("target", "odol", ""),
    ("layer", "p", ""), ("p", "set", ""), ("set", "run", ""), ("run", "odol", ""),
    ("odol", "p", "next $p$"), ("odol", "keep", ""), ("keep", "layer", "next layer"),
)


def plot_selection_loop(fontsize: float = 10) -> Figure:
    """DetPTQ's greedy selection of p (method page, section 5) as a diagram: the FP target, then two loops.

    The outer loop runs over the layers in forward order, the inner one over the candidate p; each candidate
    sets the layer to its ``s_p*``, runs the detector from the layer's unit and scores ODOL against the FP
    outputs; the lowest ODOL fixes the layer's p before the next layer is tried
    (:func:`detptq_mini.detptq.select_p`). Drawn with matplotlib alone, 9.5 inches wide: shown 684 pixels wide,
    text of ``fontsize`` points displays at ``fontsize`` pixels.

    Args:
        fontsize: the text size in points (at least 6).

    Returns:
        The figure; its axes hold one text box per step (with ``gid`` the step's key) and one arrow per edge.

    Raises:
        ValueError: ``fontsize`` below 6 or not a finite number.
    """
    if isinstance(fontsize, bool) or not isinstance(fontsize, numbers.Real) or not 6 <= float(fontsize) < 1e3:
        raise ValueError(f"fontsize={fontsize!r} must be a number >= 6 (points)")
    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    colours = {"calib": "#e8e8e8", "fp": "#e8e8e8", "target": "#e8e8e8", "layer": "#cfe0f3", "p": "#dcecc9",
               "set": "#dcecc9", "run": "#dcecc9", "odol": "#fde2c4", "keep": "#cfe0f3"}
    boxes = {}
    for key, (x, y, text) in _SELECTION_STEPS.items():
        boxes[key] = ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, gid=key,
                             bbox=dict(boxstyle="round,pad=0.4", fc=colours[key], ec="0.3", lw=1))
    fig.canvas.draw()  # the boxes' extents are needed to attach the arrows to their edges
    anchors = {("odol", "p"): ((1.0, 0.5), (1.0, 0.5), "arc3,rad=0.55"),
               ("odol", "keep"): ((1.0, 0.3), (0.5, 0.0), "arc3,rad=0.25"),
               ("keep", "layer"): ((0.5, 1.0), (1.0, 0.5), "arc3,rad=0.3"),
               ("target", "odol"): ((1.0, 0.3), (0.0, 0.5), "arc3,rad=0.15")}
    for src, dst, label in _SELECTION_ARROWS:
        start, end, style = anchors.get((src, dst), ((0.5, 0.0), (0.5, 1.0), "arc3,rad=0"))
        arrow = ax.annotate("", xy=end, xycoords=boxes[dst], xytext=start, textcoords=boxes[src],
                            arrowprops=dict(arrowstyle="-|>", color="0.25", lw=1.3, connectionstyle=style,
                                            shrinkA=2, shrinkB=2))
        arrow.set_gid(f"{src}->{dst}")
        if label:
            where = {"odol": (0.70, 0.66), "keep": (0.80, 0.86)}[src]
            ax.text(*where, label, ha="center", va="center", fontsize=fontsize, style="italic", color="0.2",
                    gid=f"label:{src}->{dst}")
    ax.set_title("DetPTQ's selection of p, one layer at a time", fontsize=fontsize + 1)
    fig.tight_layout()
    return fig
