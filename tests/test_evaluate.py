import contextlib
import copy
import io

import numpy as np
import pytest
import torch

from detptq_mini.data import ShapesDataset
from detptq_mini.evaluate import STAT_NAMES, coco_map, detections_to_coco


@pytest.fixture(scope="module")
def gt_ds():
    return ShapesDataset("val", 20, seed=0)


def _perfect(ds):
    dets = []
    for a in ds.to_coco()["annotations"]:
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9})
    return dets


def _noisy(ds, seed=0):
    """Jittered boxes, some wrong classes, some misses and false positives, random scores."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in ds.to_coco()["annotations"]:
        if rng.random() < 0.1:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 5))
        dets.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])], "score": float(rng.random())})
    for i in range(30):
        dets.append({"image_id": int(rng.integers(1, len(ds) + 1)), "category_id": int(rng.integers(1, 5)),
                     "bbox": [*rng.uniform(0, 100, 2), *rng.uniform(5, 40, 2)], "score": float(rng.random() * 0.5)})
    return dets


def test_perfect_detections_give_one(gt_ds):
    m = coco_map(_perfect(gt_ds), gt_ds.to_coco())
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)


def test_no_detections_give_zero_not_an_error(gt_ds):
    m = coco_map([], gt_ds.to_coco())
    assert m["map"] == 0.0 and m["map50"] == 0.0 and set(m) == set(STAT_NAMES)


def test_wrong_class_everywhere_gives_zero(gt_ds):
    dets = _perfect(gt_ds)
    for d in dets:
        d["category_id"] = d["category_id"] % 4 + 1
    assert coco_map(dets, gt_ds.to_coco())["map"] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_same_numbers_as_pycocotools(gt_ds, seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = _noisy(gt_ds, seed)
    ours = coco_map(dets, gt_ds.to_coco())
    gt = COCO()
    gt.dataset = copy.deepcopy(gt_ds.to_coco())
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ref = {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}
    assert 0.2 < ours["map"] < 0.95  # a non-trivial case
    for k in STAT_NAMES:
        assert ours[k] == pytest.approx(ref[k], abs=1e-6), k


def test_detections_to_coco_converts_boxes_and_labels():
    d = [{"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([2])}]
    out = detections_to_coco(d, [7])
    assert out == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
