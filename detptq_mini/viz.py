"""The figures the chapters show; every function returns a matplotlib Figure (nothing is drawn on import)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["CLASS_COLOURS", "draw_boxes", "plot_samples", "plot_detections"]

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
