"""COCO mAP of a detector, through ``faster-coco-eval`` (no hand-rolled AP).

``faster-coco-eval`` gives the same numbers as ``pycocotools`` (a test checks
this on the same detections) and is several times faster.
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ShapesDataset
from .model import postprocess
from .quant import eval_mode

__all__ = ["coco_map", "detections_to_coco", "evaluate_model", "STAT_NAMES"]

# the 12 numbers of COCOeval.summarize(), in order
STAT_NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")


def coco_map(detections: list[dict], coco_gt: dict) -> dict[str, float]:
    """COCO box mAP of ``detections`` against the ground-truth dict ``coco_gt``.

    Args:
        detections: COCO-format detections, dicts with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``
            and ``score``.
        coco_gt: a COCO ground-truth dict (e.g. ``ShapesDataset.to_coco()``).

    Returns:
        ``{"map": mAP50:95, "map50": ..., "map75": ..., ...}`` (the 12 COCO summary numbers, see ``STAT_NAMES``).
        No detections give 0.0 everywhere, not an error.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not detections:
        return {k: 0.0 for k in STAT_NAMES}
    gt = COCO()
    gt.dataset = copy.deepcopy(coco_gt)
    gt.createIndex()
    dt = gt.loadRes(copy.deepcopy(detections))
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}


def detections_to_coco(dets: list[dict[str, torch.Tensor]], image_ids: list[int]) -> list[dict]:
    """Per-image ``{"boxes" xyxy, "scores", "labels"}`` -> COCO detection dicts (category id = label + 1)."""
    out = []
    for img_id, d in zip(image_ids, dets):
        boxes = d["boxes"].detach().cpu().tolist()
        for (x1, y1, x2, y2), s, lab in zip(boxes, d["scores"].tolist(), d["labels"].tolist()):
            out.append({"image_id": int(img_id), "category_id": int(lab) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    return out


@torch.no_grad()
def predict(model: nn.Module, dataset: ShapesDataset, batch_size: int = 64, device: str | torch.device = "cpu",
            progress: bool = False) -> list[dict]:
    """Run ``model`` over ``dataset`` and return COCO-format detections (image ids ``i + 1``).

    The detections are ``model.detect(x)`` when the model has a ``detect`` method (the shipped detector, whose
    ``detect`` is :func:`~detptq_mini.model.postprocess` of its outputs, and
    :class:`~detptq_mini.adapter.RetinaNetAdapter`), else :func:`~detptq_mini.model.postprocess` of ``model(x)``
    (e.g. an ONNX Runtime session's outputs).
    """
    dets: list[dict] = []
    starts = range(0, len(dataset), batch_size)
    if progress:
        starts = tqdm(starts, desc="evaluate", unit="batch")
    with eval_mode(model):
        for s in starts:
            x = dataset.images(s, s + batch_size).to(device)
            # a detector's own detect() (RetinaNet decodes anchor deltas); else the YOLO-style decoding
            res = model.detect(x) if callable(getattr(model, "detect", None)) else postprocess(model(x))
            dets += detections_to_coco(res, list(range(s + 1, s + 1 + len(x))))
    return dets


def evaluate_model(model: nn.Module, dataset: ShapesDataset, batch_size: int = 64,
                   device: str | torch.device = "cpu", progress: bool = False) -> dict[str, float]:
    """COCO mAP of ``model`` on ``dataset`` (same dict as :func:`coco_map`)."""
    return coco_map(predict(model, dataset, batch_size, device, progress), dataset.to_coco())
