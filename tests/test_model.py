import pytest
import torch
from torchvision.ops import box_iou

from detptq_mini.model import STRIDES, DenseOutputs, Detector, decode, postprocess


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Detector().eval()


def test_output_structure_and_size(model):
    x = torch.rand(2, 3, 128, 128)
    out = model(x)
    assert isinstance(out, DenseOutputs)
    for lvl, s in enumerate(STRIDES):
        assert out.cls[lvl].shape == (2, 4, 128 // s, 128 // s)
        assert out.box[lvl].shape == (2, 4, 128 // s, 128 // s)
        assert (out.box[lvl] >= 0).all()
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n < 1.6e6
    assert all(m.out_channels % 16 == 0 or m.out_channels in (4,) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_units_and_convs_have_stable_names(model):
    names = model.unit_names
    assert names[0] == "backbone.stem" and names[-1] == "head.p5.box"
    assert len(names) == 22 and len(set(names)) == 22
    convs = model.conv_names()
    assert convs[0] == "backbone.stem.conv"
    assert sum(c.endswith(".pred") for c in convs) == 6
    for c in convs:
        assert isinstance(model.get_submodule(c), torch.nn.Conv2d)
        assert model.unit_of(c) in names


@pytest.mark.parametrize("unit", ["backbone.stem", "backbone.c2f2", "backbone.sppf", "neck.td3", "neck.bu4", "head.p3.box", "head.p5.box"])
def test_restart_from_any_unit_equals_full_forward(model, unit):
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        full = model(x)
        cache = model.capture(x, unit)
        again = model.forward_from(unit, cache)
    assert set(cache) == set(model.live_names(unit))
    for a, b in zip(full.cls + full.box, again.cls + again.box):
        assert torch.equal(a, b)


def test_live_tensors_of_the_neck_include_backbone_skips(model):
    assert set(model.live_names("neck.td3")) == {"c3", "c5", "t4"}
    with pytest.raises(ValueError, match="unit="):
        model.live_names("neck.nope")


def test_restart_needs_the_right_cache(model):
    x = torch.rand(1, 3, 128, 128)
    cache = model.capture(x, "neck.td4")
    with pytest.raises(ValueError, match="needs tensor"):
        model.forward_from("neck.bu4", cache)


def _dense_from_boxes(boxes, labels, scores, k=4, size=128, levels=None):
    """Build raw outputs whose decoded boxes at chosen locations (one per box, at ``levels``) are exactly ``boxes``."""
    levels = levels or [0] * len(boxes)
    cls = [torch.full((1, k, size // s, size // s), -20.0) for s in STRIDES]
    box = [torch.ones(1, 4, size // s, size // s) for s in STRIDES]
    for (x1, y1, x2, y2), lab, sc, lvl in zip(boxes, labels, scores, levels):
        s = STRIDES[lvl]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        i, j = int(cy // s), int(cx // s)
        ccx, ccy = (j + 0.5) * s, (i + 0.5) * s
        box[lvl][0, :, i, j] = torch.tensor([ccx - x1, ccy - y1, x2 - ccx, y2 - ccy]) / s
        cls[lvl][0, lab, i, j] = torch.logit(torch.tensor(sc))
    return DenseOutputs(tuple(cls), tuple(box))


def test_decode_recovers_hand_made_boxes():
    boxes = [[10.0, 12.0, 30.0, 40.0], [60.0, 60.0, 100.0, 90.0]]
    out = _dense_from_boxes(boxes, [1, 3], [0.9, 0.8])
    probs, decoded = decode(out)
    top = probs[0].max(-1).values.topk(2).indices
    got = decoded[0, top]
    assert torch.allclose(box_iou(got, torch.tensor(boxes)).max(0).values, torch.ones(2), atol=1e-5)


def test_nms_keeps_best_of_overlapping_same_class_and_keeps_other_classes():
    boxes = [[10.0, 10.0, 50.0, 50.0], [12.0, 11.0, 51.0, 50.0], [60.0, 60.0, 100.0, 100.0]]
    # the first two overlap (IoU ~0.9) and share class 0: NMS keeps the 0.9 one; the third is class 2
    out = _dense_from_boxes(boxes, [0, 0, 2], [0.9, 0.7, 0.6], levels=[0, 1, 0])
    det = postprocess(out, score_thresh=0.05)[0]
    assert det["labels"].tolist() == [0, 2]
    assert det["scores"].tolist() == pytest.approx([0.9, 0.6], abs=1e-5)
    assert torch.allclose(det["boxes"][0], torch.tensor(boxes[0]), atol=1e-4)
    # same boxes with different classes are both kept (class-wise NMS)
    out = _dense_from_boxes(boxes[:2], [0, 1], [0.9, 0.7], levels=[0, 1])
    assert sorted(postprocess(out, score_thresh=0.05)[0]["labels"].tolist()) == [0, 1]


def test_bad_images_are_rejected(model):
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 100, 100))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 128, 128))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
