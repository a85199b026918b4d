"""The figures the chapters show; every ``plot_*`` function returns a matplotlib Figure (nothing is drawn on
import). :func:`strip_cdn_links` makes an animation's HTML player work offline."""

from __future__ import annotations

import html
import numbers
import re

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["CLASS_COLOURS", "draw_boxes", "plot_samples", "plot_detections", "plot_ratio_vs_bits", "strip_cdn_links",
           "Table", "table", "plot_selection_loop"]

CLASS_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628")


def draw_boxes(ax, boxes, labels, class_names, scores=None, dashed: bool = False) -> None:
    """Draw xyxy ``boxes`` on ``ax``, coloured by label, with the class name (and score) as a tag."""
    for i, (box, lab) in enumerate(zip(torch.as_tensor(boxes).tolist(), torch.as_tensor(labels).tolist())):
        x1, y1, x2, y2 = box
        colour = CLASS_COLOURS[lab % len(CLASS_COLOURS)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=colour, ls="--" if dashed else "-"))
        tag = class_names[lab] if scores is None else f"{class_names[lab]} {float(scores[i]):.2f}"
        ax.text(x1, y1 - 1, tag, color="white", fontsize=6, va="bottom", bbox=dict(fc=colour, ec="none", pad=0.5))


def _grid(n: int, cols: int, size: float = 2.4) -> tuple[Figure, list]:
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_samples(dataset, n: int = 8, cols: int = 4) -> Figure:
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
                    score_thresh: float = 0.3, cols: int = 4, titles: list[str] | None = None) -> Figure:
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


def plot_ratio_vs_bits(summary: dict, labels: list[str] | None = None, title: str | None = None) -> Figure:
    """Percent of the FP mAP50:95 against bits, one line per method: the picture of a benchmark table.

    Args:
        summary: :func:`detptq_mini.benchmark.summarize` of a result file.
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
        xs = [j for j, b in enumerate(bits) if b in cells]
        if not xs:
            continue
        ys = [100 * cells[bits[j]]["ratio_to_fp_mean"] for j in xs]
        errs = [0.0 if cells[bits[j]]["map_std"] is None
                else 100 * cells[bits[j]]["ratio_to_fp_mean"] * cells[bits[j]]["map_std"] / cells[bits[j]]["map_mean"]
                for j in xs]  # the FP mAP is one number: the ratio's std is the mAP's std over the FP mAP
        dx = (i - (len(labels) - 1) / 2) * 0.04  # a small offset keeps overlapping error bars apart
        line = ax.errorbar([x + dx for x in xs], ys, yerr=errs, marker="o", ms=4, capsize=3, label=lab)
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
    ax.legend(fontsize=8, loc="lower left")
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
def _cell_text(value, fmt: str) -> str:
    """A table cell as text: numbers (not bools) with ``fmt``, None as an em dash, anything else as ``str``."""
    if value is None:
        return "\u2014"
    if isinstance(value, (bool, numbers.Integral)) or not isinstance(value, numbers.Real):
        return str(value)  # integers (counts) as they are
    return format(float(value), fmt)


class Table:
    """A small table that a notebook shows as an HTML ``<table>`` (and as aligned text elsewhere).

    The chapters show their results with it instead of printing padded columns: the book's theme lays the HTML
    table out to fit the page, and a reader can copy it. Build one with :func:`table`.

    Attributes:
        columns: the column headers.
        rows: the rows, each a list of cell texts (already formatted).
        index: the row labels (the first column), or None.
        index_name: the header of the index column.
        title: a caption shown above the table, or None.
    """

    def __init__(self, columns: list[str], rows: list[list[str]], index: list[str] | None, index_name: str,
                 title: str | None, numeric: list[bool]):
        self.columns, self.rows, self.index = columns, rows, index
        self.index_name, self.title, self._numeric = index_name, title, numeric

    def _repr_html_(self) -> str:
        esc = html.escape
        right = ' style="text-align: right"'
        head = "".join(f"<th>{esc(c)}</th>" for c in ([self.index_name] if self.index is not None else [])
                       + self.columns)
        body = []
        for i, row in enumerate(self.rows):
            cells = [f"<th>{esc(self.index[i])}</th>"] if self.index is not None else []
            cells += [f"<td{right if num else ''}>{esc(v)}</td>" for v, num in zip(row, self._numeric)]
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption = f"<caption>{esc(self.title)}</caption>" if self.title else ""
        return (f'<table class="detptq-table">{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table>")

    def __repr__(self) -> str:
        header = ([self.index_name] if self.index is not None else []) + self.columns
        lines = [([self.index[i]] if self.index is not None else []) + row for i, row in enumerate(self.rows)]
        widths = [max(len(r[j]) for r in [header] + lines) for j in range(len(header))]
        off = 1 if self.index is not None else 0

        def fmt_line(cells):
            return "  ".join(c.rjust(w) if j >= off and self._numeric[j - off] else c.ljust(w)
                             for j, (c, w) in enumerate(zip(cells, widths))).rstrip()

        out = ([self.title] if self.title else []) + [fmt_line(header)] + [fmt_line(r) for r in lines]
        return "\n".join(out)


def table(rows, columns, index=None, index_name: str = "", fmt: str = ".3f", title: str | None = None) -> Table:
    """A :class:`Table` of ``rows`` under ``columns``: how the chapters show a result.

    Args:
        rows: a sequence of rows, each a sequence with one value per column (real numbers are formatted with
            ``fmt``, integers and anything else with ``str``, None shows as an em dash).
        columns: the column headers, one per value of a row.
        index: the row labels shown as a first column (one per row), or None for no label column.
        index_name: the header of the label column.
        fmt: the format spec of numbers, e.g. ``".3f"`` or ``".1%"``.
        title: a caption above the table.

    Returns:
        A :class:`Table`; a notebook displays it as an HTML table.

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
    numeric = [all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in col)
               and any(v is not None for v in col) for col in zip(*rows)] if rows else [False] * len(columns)
    return Table(columns, [[_cell_text(v, fmt) for v in r] for r in rows], index, str(index_name), title, numeric)


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
