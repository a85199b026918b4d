"""The RetinaNet adapter: torchvision's RetinaNet as a UnitDetector (the restartable-detector base class).

torchvision is the oracle: the adapter's dense outputs and detections must equal the RetinaNet's own, its
units must restart the forward exactly, BN folding must handle the ``FrozenBatchNorm2d`` of a RetinaNet with
real weights, and ``run_ptq(..., "detptq")`` / ``select_p`` / ODOL must run on it. Models are built with
``weights=None, weights_backbone=None`` (nothing downloads) and small images.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from detptq_mini.adapter import RetinaNetAdapter, freeze_batchnorm
from detptq_mini.detptq import select_p
from detptq_mini.lp import search_model_scales
from detptq_mini.model import DenseOutputs, Detector, UnitDetector
from detptq_mini.odol import odol, odol_terms
from detptq_mini.pipeline import run_ptq
from detptq_mini.quant import QuantConfig, collect_activations, fold_bn, quant_layers, quantize_model

SIZE = 64


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (a fresh model's are the identity), so folding is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model


@pytest.fixture(scope="module")
def retinanet():
    """retinanet_resnet50_fpn with random weights, 4 classes, 64-pixel input, frozen BN as with real weights."""
    torch.manual_seed(0)
    m = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=SIZE, max_size=SIZE)
    return freeze_batchnorm(_randomize_bn(m)).eval()


@pytest.fixture(scope="module")
def adapter(retinanet):
    return RetinaNetAdapter(retinanet)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))  # resized by the transform


@torch.no_grad()
def _torchvision_head(model: RetinaNet, x):
    image_list, _ = model.transform(list(x))
    features = list(model.backbone(image_list.tensors).values())
    return model.head(features)


@torch.no_grad()
def test_forward_equals_torchvision_head(retinanet, adapter, images):
    out = adapter(images)
    assert isinstance(out, DenseOutputs) and len(out.cls) == len(out.box) == 1
    ref = _torchvision_head(retinanet, images)
    n = ref["cls_logits"].shape[1]
    assert out.cls[0].shape == (2, 4, n, 1) and out.box[0].shape == (2, 4, n, 1)
    mine = adapter.head_outputs(out)
    assert torch.equal(mine["cls_logits"], ref["cls_logits"])
    assert torch.equal(mine["bbox_regression"], ref["bbox_regression"])


@torch.no_grad()
def test_detect_equals_torchvision(retinanet, images):
    model = RetinaNet.__new__(RetinaNet)  # the same model, with a score threshold that keeps detections
    model.__dict__.update(retinanet.__dict__)
    model.score_thresh = 0.0
    ad = RetinaNetAdapter(model)
    ref = model(list(images))
    got = ad.detect(images)
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        assert len(r["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], r[key]), key


def test_the_adapter_is_a_unit_detector(adapter, images):
    """The adapter declares units, outputs and prepare; the restartable forward is the base class's."""
    assert isinstance(adapter, UnitDetector)
    for name in ("run", "capture", "forward_from", "collect", "forward", "live_names", "dependents", "conv_names"):
        assert getattr(type(adapter), name) is getattr(UnitDetector, name), name
    on, off = adapter.dependents("fpn.p7")
    assert [adapter.units[j].name for j in on] == ["head.cls", "head.box"] and off == ()


def test_adapter_does_not_modify_or_share_the_input_model(retinanet, adapter):
    ids = {id(p) for p in retinanet.parameters()}
    assert not ids & {id(p) for p in adapter.parameters()}
    assert isinstance(retinanet.backbone.body.bn1, FrozenBatchNorm2d)


@torch.no_grad()
def test_units_are_modules_giving_their_output_tensor(adapter, images):
    """Reconstruction's contract: get_submodule(unit.name)(*inputs) is the unit's single output tensor."""
    env = adapter.run({"image": adapter.prepare(images)})
    assert adapter.capture(images, 0).keys() == {"image"}
    names = [u.name for u in adapter.units]
    assert len(set(names)) == len(names) and names[0] == "body.stem" and names[-2:] == ["head.cls", "head.box"]
    for u in adapter.units:
        y = adapter.get_submodule(u.name)(*[env[n] for n in u.inputs])
        assert isinstance(y, torch.Tensor) and torch.equal(y, env[u.output]), u.name
    # every conv belongs to exactly one unit, once
    convs = adapter.conv_names()
    assert len(convs) == len(set(convs)) == sum(isinstance(m, nn.Conv2d) for m in adapter.modules())
    assert convs[0] == "body.stem.0" and convs[-1] == "head.box.pred"


@pytest.mark.parametrize("unit", ["body.layer1.0", "body.layer3.2", "fpn.lat4", "fpn.p6", "head.cls", "head.box"])
@torch.no_grad()
def test_forward_from_a_middle_unit_equals_the_full_forward(adapter, images, unit):
    full = adapter(images)
    cache = adapter.capture(images, unit)
    assert set(cache) == set(adapter.live_names(unit))
    again = adapter.forward_from(unit, cache)
    assert torch.equal(again.cls[0], full.cls[0]) and torch.equal(again.box[0], full.box[0])
    k = adapter.unit_index(unit)
    env = adapter.run(adapter.run({"image": adapter.prepare(images)}, 0, k), k)
    assert torch.equal(env["cls"], full.cls[0])


@torch.no_grad()
def test_fold_bn_folds_frozen_batchnorm_of_resnet(adapter, images):
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in adapter.modules()) == 53  # ResNet-50
    folded = fold_bn(adapter)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
    a, b = adapter(images), folded(images)
    for x, y in ((a.cls[0], b.cls[0]), (a.box[0], b.box[0])):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in adapter.modules())  # the input is not modified


def test_freeze_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    m = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    f = freeze_batchnorm(m)
    assert isinstance(f[1], FrozenBatchNorm2d) and isinstance(m[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(m(x), f(x), atol=1e-6)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        freeze_batchnorm("resnet")


@torch.no_grad()
def test_odol_on_the_adapter_outputs(adapter, images):
    q = quantize_model(adapter, QuantConfig(w_bits=4, a_bits=4))
    from detptq_mini.quant import calibrate_minmax

    calibrate_minmax(q, images)
    fp_out, q_out = adapter(images), q(images)
    assert float(odol(fp_out, fp_out)) == 0.0
    terms = odol_terms(fp_out, q_out)
    assert float(terms["cls"]) > 0 and float(terms["loc"]) > 0
    assert torch.isfinite(terms["total"])
    with pytest.raises(ValueError, match="strides=.*use loc='l1'"):  # IoU decodes ltrb distances; deltas are not
        odol(fp_out, q_out, loc="iou")


def test_quantize_model_keeps_stem_and_predictions_at_8_bits(adapter):
    q = quantize_model(adapter, QuantConfig(w_bits=4, a_bits=4))
    bits = {n: (m.weight_quantizer.bits, m.input_quantizer.bits) for n, m in quant_layers(q).items()}
    assert len(bits) == 71
    eight = sorted(n for n, b in bits.items() if b == (8, 8))
    assert eight == ["body.stem.0", "head.box.pred", "head.cls.pred"]


def test_head_units_and_the_head_fp_protocol(adapter):
    assert adapter.head_units() == ("head.cls", "head.box")  # the base class's default: the units writing outputs
    q = quantize_model(adapter, QuantConfig(w_bits=4, a_bits=4, protocol="head-fp"))
    head = [n for n in adapter.conv_names() if n.startswith("head.")]
    assert len(head) == 10  # four subnet convs and the prediction conv, for classes and for boxes
    assert all(type(q.get_submodule(n)) is nn.Conv2d for n in head)
    bits = {n: (m.weight_quantizer.bits, m.input_quantizer.bits) for n, m in quant_layers(q).items()}
    assert list(bits) == [n for n in adapter.conv_names() if not n.startswith("head.")]
    assert sorted(n for n, b in bits.items() if b == (8, 8)) == ["body.stem.0"]  # the stem stays W8A8


def test_run_ptq_detptq_and_select_p_run(adapter, images):
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    res = run_ptq(adapter, images[:1], "detptq", 4, 4, ps=(2.0, 4.0), grid=8, max_elements=2**10)
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in before.items())  # input model untouched
    chosen = res.report["chosen_p"]
    assert list(chosen) == list(quant_layers(res.model)) and len(chosen) == 71
    assert set(chosen.values()) <= {2.0, 4.0}
    table = res.report["selection"]["table"]
    assert all(chosen[n] == float(min(row, key=row.get)) for n, row in table.items())
    with torch.no_grad():
        total = float(odol(adapter(images), res.model(images)))
    assert 0 < total < float("inf")

    # select_p directly, per unit, on a subset of layers
    q = quantize_model(adapter, QuantConfig(w_bits=8, a_bits=8))
    layers = ["fpn.out3.0", "head.cls.subnet.0.0", "head.cls.pred"]
    scales = search_model_scales(q, images[:1], (2.0, 3.0), grid=4, max_elements=2**8)  # rest_p = 2 for the others
    sel = select_p(q, images[:1], scales, ps=(2.0, 3.0), granularity="unit", layers=layers)
    assert sel.order == ("fpn.out3", "head.cls") and set(sel.chosen.values()) <= {2.0, 3.0}


def test_not_a_retinanet_is_an_error(retinanet):
    with pytest.raises(ValueError, match="model must be a torchvision.models.detection.RetinaNet"):
        RetinaNetAdapter(Detector())
    odd = RetinaNet.__new__(RetinaNet)
    odd.__dict__.update(retinanet.__dict__)
    odd.backbone = nn.Conv2d(3, 256, 3)
    odd.backbone.out_channels = 256
    with pytest.raises(ValueError, match="ResNet-FPN"):
        RetinaNetAdapter(odd)


def test_bad_images_are_an_error(adapter):
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        adapter(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="float tensor"):
        adapter(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unit='nope' is not a unit"):
        adapter.capture(torch.rand(1, 3, 64, 64), "nope")


# ------------------------------------------------- shared modules in collect_activations (quant.py)
class _Shared(nn.Module):
    """One conv applied to two inputs of different sizes in one forward, as RetinaNet's head on its levels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x).sum() + self.conv(x[..., ::2, ::2]).sum()


def test_collect_activations_pools_the_calls_of_a_shared_conv():
    torch.manual_seed(0)
    model, x = _Shared(), torch.randn(3, 3, 8, 8)
    got = collect_activations(model, x, ["conv"], max_elements=10_000, batch_size=2)["conv"]
    want = torch.cat([x[:2].reshape(-1), x[:2, :, ::2, ::2].reshape(-1), x[2:].reshape(-1), x[2:, :, ::2, ::2].reshape(-1)])
    assert torch.equal(got, want)
    small = collect_activations(model, x, ["conv"], max_elements=50, batch_size=2)["conv"]
    assert small.numel() == 50 and small[0] == x.min() and small[1] == x.max()


def test_reconstruction_runs_on_the_adapter_units(adapter, images):
    """The adapter's units serve block reconstruction too: a few QDrop steps on two units, hard weights after."""
    from detptq_mini.quant import calibrate_minmax
    from detptq_mini.reconstruction import ReconConfig, reconstruct

    q = calibrate_minmax(quantize_model(adapter, QuantConfig(w_bits=4, a_bits=8)), images)
    units = [adapter.units[1].name, "head.box"]
    hist = reconstruct(q, fold_bn(adapter), images, ReconConfig(iters=2, batch_size=2), units=units)
    assert list(hist.units) == units
    assert all(h.before > 0 and h.after > 0 and len(h.loss) == 2 for h in hist.units.values())
    layer = quant_layers(q)["head.box.pred"]
    wq, w = layer.weight_quantizer, layer.conv.weight.detach()
    from detptq_mini.quant import fake_quantize

    assert torch.equal(fake_quantize(w, wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.axis), w)
