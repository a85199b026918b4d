"""A seeded synthetic detection data set: coloured shapes on textured backgrounds.

Every image is drawn from its own random generator, seeded by
``(split, seed, index)``, so the data set is

* deterministic: the same ``(split, seed, i)`` gives the same image, bit for bit;
* prefix-stable: image ``i`` does not depend on ``size``;
* split-disjoint: ``train``, ``val`` and ``calib`` use different seed streams.

A "calibration seed" in the book and the benchmarks is the ``seed`` of the
``calib`` split. Images are ``(3, H, W)`` float tensors in [0, 1]; targets are
``{"boxes": (N, 4) xyxy pixels, "labels": (N,) int64}``. Boxes are the tight
boxes of the drawn pixels (x2, y2 exclusive), so they are exact.

``to_coco()`` gives COCO ground truth with image ids ``i + 1`` and category ids
``label + 1`` (the public contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .checks import check_int

__all__ = ["CLASS_NAMES", "SPLITS", "ShapesDataset", "batches"]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SPLITS: dict[str, int] = {"train": 1, "val": 2, "calib": 3}  # disjoint seed streams

_MIN_SIZE, _MAX_SIZE = 8, 48  # nominal object size in pixels (diameter / side before rotation)
_MAX_OBJECTS = 6


@dataclass(frozen=True)
class _Shape:
    label: int
    cx: float
    cy: float
    size: float
    angle: float


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A noisy, textured background: a colour gradient, a few sinusoidal stripes and pixel noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0 = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    c1 = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    theta = rng.uniform(0, np.pi)
    t = (np.cos(theta) * xx + np.sin(theta) * yy) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    for _ in range(int(rng.integers(1, 4))):  # stripes / blobs texture
        fx, fy = rng.uniform(-0.35, 0.35, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.03, 0.10)
        img = img + amp * np.sin(fx * xx + fy * yy + phase)[None] * rng.choice([-1.0, 1.0], size=3)[:, None, None]
    img = img + rng.normal(0.0, rng.uniform(0.02, 0.07), size=img.shape).astype(np.float32)
    return img.astype(np.float32)


def _mask(shape: _Shape, h: int, w: int) -> np.ndarray:
    """Boolean mask of one shape on an ``h x w`` grid (pixel centres at +0.5)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xx - shape.cx, yy - shape.cy
    r = shape.size / 2
    if shape.label == 0:  # circle
        return dx * dx + dy * dy <= r * r
    ca, sa = np.cos(shape.angle), np.sin(shape.angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy  # rotated coordinates
    if shape.label == 1:  # square (rotated by at most 30 degrees)
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if shape.label == 2:  # triangle: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3 + np.pi / 2
            inside &= (np.cos(a) * u + np.sin(a) * v) <= r * 0.5
        return inside
    # cross: union of two bars
    arm = r * 0.33
    return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image; returns (image HWC-free (3, H, W) float32 in [0, 1], boxes (N, 4), labels (N,))."""
    h = w = image_size
    img = _background(rng, h, w)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    n_target = int(rng.integers(1, _MAX_OBJECTS + 1))
    for _ in range(n_target * 4):  # rejection sampling of non-overlapping placements
        if len(boxes) >= n_target:
            break
        label = int(rng.integers(0, len(CLASS_NAMES)))
        size = float(rng.uniform(_MIN_SIZE, _MAX_SIZE))
        cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
        angle = float(rng.uniform(-np.pi / 6, np.pi / 6)) if label in (1, 3) else float(rng.uniform(0, 2 * np.pi))
        m = _mask(_Shape(label, float(cx), float(cy), size, angle), h, w)
        ys, xs = np.nonzero(m)
        if len(xs) < 12:
            continue
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        if any(_iou(box, b) > 0.05 for b in boxes):
            continue
        # an object colour that stands out from the background under it
        under = img[:, m].mean(axis=1)
        for _try in range(8):
            colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
            if np.abs(colour - under).sum() > 0.6:
                break
        shade = 1.0 + rng.normal(0, 0.04, size=(1, int(m.sum()))).astype(np.float32)
        img[:, m] = colour[:, None] * shade
        boxes.append(box)
        labels.append(label)
    img = np.clip(img, 0.0, 1.0)
    return img, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


class ShapesDataset(torch.utils.data.Dataset):
    """Seeded synthetic shapes detection data set (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"calib"``.
        size: number of images, > 0.
        seed: picks the images of the split (the "calibration seed" for ``calib``).
        image_size: side of the square images in pixels (>= 64).

    Images are generated once, on construction, and kept as uint8.
    """

    class_names = CLASS_NAMES

    def __init__(self, split: str, size: int, seed: int = 0, image_size: int = 128):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not a split; allowed: {', '.join(map(repr, SPLITS))}")
        self.split, self.size = split, check_int("size", size, 1, hint="(the number of images)")
        self.seed, self.image_size = check_int("seed", seed, 0), check_int("image_size", image_size, 64)
        images = np.empty((self.size, 3, self.image_size, self.image_size), dtype=np.uint8)
        self.targets: list[dict[str, torch.Tensor]] = []
        for i in range(self.size):
            rng = np.random.default_rng([SPLITS[split], self.seed, i])
            img, boxes, labels = _draw(rng, self.image_size)
            images[i] = np.round(img * 255.0).astype(np.uint8)
            self.targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)})
        self.images_u8 = torch.from_numpy(images)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for a data set of {self.size} images")
        i = i % self.size
        t = self.targets[i]
        return self.images_u8[i].float() / 255.0, {"boxes": t["boxes"].clone(), "labels": t["labels"].clone()}

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``start:stop`` as one float tensor ``(N, 3, H, W)`` in [0, 1]."""
        return self.images_u8[start:stop].float() / 255.0

    def to_coco(self) -> dict:
        """COCO ground truth: image ids ``i + 1``, category ids ``label + 1``, boxes ``[x, y, w, h]``."""
        images, annotations = [], []
        for i, t in enumerate(self.targets):
            images.append({"id": i + 1, "width": self.image_size, "height": self.image_size, "file_name": f"{self.split}_{self.seed}_{i:06d}.png"})
            for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
                x1, y1, x2, y2 = box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                })
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, size={self.size}, seed={self.seed}, image_size={self.image_size})"


def batches(dataset: ShapesDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    """Iterate over ``dataset`` in order, in batches of ``batch_size`` (the last one may be smaller)."""
    for s in range(0, len(dataset), batch_size):
        idx = range(s, min(s + batch_size, len(dataset)))
        yield dataset.images(s, idx.stop), [dataset[i][1] for i in idx]
