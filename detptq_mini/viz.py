"""The figures the chapters show; every ``plot_*`` function returns a matplotlib Figure (nothing is drawn on
import). :func:`strip_cdn_links` makes an animation's HTML player work offline."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

__all__ = ["CLASS_COLOURS", "draw_boxes", "plot_samples", "plot_detections", "plot_ratio_vs_bits", "plot_unit_losses",
           "plot_reconstruction_flow", "strip_cdn_links"]

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


#: Line styles and markers cycled with the colours, so that series stay apart in grey print and for colour-blind readers.
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"))


def plot_unit_losses(profiles: dict[str, dict[str, float]], title: str | None = None, log: bool = True) -> Figure:
    """Per-unit losses after reconstruction, one line per method: where along the network a method loses.

    Args:
        profiles: ``{label: {unit: loss}}``, e.g. :func:`detptq_mini.benchmark.unit_losses` of each method's cells;
            each profile's units in forward order. The x axis is every unit of any profile; a profile without a
            unit (e.g. the head left in FP) has a gap there.
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
