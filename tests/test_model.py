import pytest
import torch
from torchvision.ops import box_iou

from torch import nn

from detptq_mini.model import (STRIDES, DenseOutputs, Detector, Unit, UnitDetector, check_unit_detector, decode,
                               postprocess)


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


class _Tiny(UnitDetector):
    """A two-unit detector: a conv, then class and box convs; ``drop`` leaves one piece out."""

    def __init__(self, drop: str | None = None, units=None):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, 2, 1)
        self.box = nn.Conv2d(8, 4, 1)
        if drop != "units":
            self.units = units or (Unit("body", ("image",), "f"), Unit("cls", ("f",), "c"), Unit("box", ("f",), "b"))
        if drop != "outputs":
            self.outputs = (("c",), ("b",))

    def prepare(self, x):
        return x


class _NoPrepare(_Tiny):
    prepare = UnitDetector.prepare  # left abstract


class _Later(_Tiny):
    """A subclass whose own __init__ sets the pieces after its parent's: checked once, when it is complete."""

    def __init__(self):
        super().__init__(drop="units")
        self.units = (Unit("body", ("image",), "f"), Unit("cls", ("f",), "c"), Unit("box", ("f",), "b"))


def test_unit_detector_gives_the_restartable_forward():
    tiny = _Later()
    x = torch.rand(1, 3, 8, 8)
    out = tiny(x)
    assert isinstance(out, DenseOutputs) and out.cls[0].shape == (1, 2, 8, 8) and out.box[0].shape == (1, 4, 8, 8)
    assert torch.equal(tiny.forward_from("cls", tiny.capture(x, "cls")).box[0], out.box[0])
    assert tiny.dependents("body") == ((1, 2), ()) and tiny.dependents("cls") == ((), (2,))
    assert tiny.conv_names() == ("body", "cls", "box") and tiny.unit_of("cls") == "cls"


def test_head_units_are_the_units_that_write_an_output(model):
    assert model.head_units() == ("head.p3.cls", "head.p3.box", "head.p4.cls", "head.p4.box", "head.p5.cls",
                                  "head.p5.box")
    assert _Tiny().head_units() == ("cls", "box")  # the base class's default, for any UnitDetector

    class _SharedStem(_Tiny):  # a subclass may say otherwise, e.g. a head with a shared first conv
        def head_units(self):
            return ("body",) + super().head_units()

    assert _SharedStem().head_units() == ("body", "cls", "box")


def test_detector_dependents(model):
    on, off = model.dependents("neck.td3")  # n3 feeds the stride-8 head, down3, bu4, ..., not the rest
    names = [model.units[j].name for j in on]
    assert names == ["neck.down3", "neck.bu4", "neck.down4", "neck.bu5", "head.p3.cls", "head.p3.box",
                     "head.p4.cls", "head.p4.box", "head.p5.cls", "head.p5.box"]
    assert off == ()
    on, off = model.dependents("head.p3.cls")
    assert on == () and off == tuple(range(17, 22))
    with pytest.raises(ValueError, match="unit="):
        model.dependents(len(model.units))


@pytest.mark.parametrize("make, message", [
    (lambda: _Tiny(drop="units"), "_Tiny is not a complete UnitDetector: it sets no `units`"),
    (lambda: _Tiny(drop="outputs"), "_Tiny is not a complete UnitDetector: it sets no `outputs`"),
    (lambda: _NoPrepare(), "_NoPrepare is not a complete UnitDetector: it does not implement `prepare"),
    (lambda: _Tiny(units=[Unit("body", ("image",), "f")]), r"_Tiny.units must be a non-empty tuple of Unit"),
    (lambda: _Tiny(units=(Unit("body", ("image",), "f"), Unit("head", ("f",), "c"), Unit("box", ("f",), "b"))),
     "unit 'head' is not a submodule"),
    (lambda: _Tiny(units=(Unit("body", ("image",), "f"), Unit("cls", ("g",), "c"), Unit("box", ("f",), "b"))),
     r"unit 'cls' reads \['g'\], which no earlier unit writes"),
    (lambda: _Tiny(units=(Unit("body", ("image",), "f"), Unit("cls", ("f",), "c"), Unit("box", ("f",), "x"))),
     r"_Tiny.outputs names \['b'\], which no unit writes"),
])
def test_an_incomplete_unit_detector_fails_when_built(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_detector_is_a_unit_detector_and_others_are_refused(model):
    assert isinstance(model, UnitDetector)
    check_unit_detector(model)
    with pytest.raises(ValueError, match="qmodel must be a UnitDetector .*restartable detector.*got Sequential"):
        check_unit_detector(nn.Sequential(nn.Conv2d(3, 3, 1)), "qmodel")


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
