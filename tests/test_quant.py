"""detptq_mini.quant: fake quantization against torch's ops, STE/LSQ gradients, BN folding, quantized model."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detptq_mini.model import Detector
from detptq_mini.quant import (
    PROTOCOLS, QuantConfig, QuantConv2d, Quantizer, calibrate_minmax, collect_activations, fake_quantize, fold_bn,
    head_convs, int_range, qparams_from_range, quant_layers, quantize_model, set_quant_state,
)

SETTINGS = settings(max_examples=60, deadline=None)


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _outputs(out) -> list[torch.Tensor]:
    return list(out.cls) + list(out.box)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return _random_bn(Detector())


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------ fake quantize
@st.composite
def fq_case(draw, per_channel: bool):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    qmin, qmax = int_range(bits, symmetric)
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(0, ndim - 1)) if per_channel else None
    c = shape[axis] if per_channel else 1
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, generator=g) * 2 ** draw(st.integers(-6, 2)) + 1e-4
    ends = draw(st.sampled_from(["random", "min", "max"]))  # zero points at the range ends too
    if symmetric:
        zp = torch.zeros(c, dtype=torch.int32)
    elif ends == "random":
        zp = torch.randint(qmin, qmax + 1, (c,), generator=g, dtype=torch.int32)
    else:
        zp = torch.full((c,), qmin if ends == "min" else qmax, dtype=torch.int32)
    # values well outside the range, and exact half steps (round half to even)
    x = torch.randn(shape, generator=g) * scale.max() * (qmax - qmin) * 0.7
    if draw(st.booleans()):
        x = (torch.randint(-2 * qmax, 2 * qmax, shape, generator=g) + 0.5) * scale[0]
    return x, scale, zp, qmin, qmax, axis


@SETTINGS
@given(fq_case(per_channel=False))
def test_fake_quantize_per_tensor_equals_torch(case):
    x, scale, zp, qmin, qmax, _ = case
    ours = fake_quantize(x, float(scale[0]), int(zp[0]), qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale[0]), int(zp[0]), qmin, qmax)
    assert torch.equal(ours, ref)
    ours_t = fake_quantize(x, scale[:1], zp[:1], qmin, qmax)  # one-element tensors work too
    assert torch.equal(ours_t, ref)


@SETTINGS
@given(fq_case(per_channel=True))
def test_fake_quantize_per_channel_equals_torch(case):
    x, scale, zp, qmin, qmax, axis = case
    ours = fake_quantize(x, scale, zp, qmin, qmax, axis)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    assert torch.equal(ours, ref)


def test_fake_quantize_channels_last_and_half_ties():
    x = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    s, z = torch.rand(3) + 0.1, torch.zeros(3, dtype=torch.int32)
    out = fake_quantize(x, s, z, -8, 7, axis=0)
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(x, s, z, 0, -8, 7))
    assert out.is_contiguous(memory_format=torch.channels_last)
    halves = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert fake_quantize(halves, 1.0, 0, -8, 7).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]


@SETTINGS
@given(fq_case(per_channel=True))
def test_ste_gradient_is_its_definition(case):
    x, scale, zp, qmin, qmax, axis = case
    x = x.clone().requires_grad_(True)
    g = torch.randn(x.shape)
    fake_quantize(x, scale, zp, qmin, qmax, axis).backward(g)
    view = [1] * x.dim()
    view[axis] = -1
    q = torch.round(x.detach() * (1.0 / scale.view(view))) + zp.view(view)
    assert torch.equal(x.grad, g * ((q >= qmin) & (q <= qmax)))
    xr = x.detach().clone().requires_grad_(True)  # and torch's own backward
    torch.fake_quantize_per_channel_affine(xr, scale, zp, axis, qmin, qmax).backward(g)
    assert torch.equal(x.grad, xr.grad)


def test_scale_gradient_matches_torch_learnable_fake_quant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g) * 3
    for qmin, qmax, z in ((0, 15, 5), (-8, 7, 0)):
        s = torch.tensor([0.3], requires_grad=True)
        xa = x.clone().requires_grad_(True)
        fake_quantize(xa, s, z, qmin, qmax).square().sum().backward()
        s_ref = torch.tensor([0.3], requires_grad=True)
        xb = x.clone().requires_grad_(True)
        torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, torch.tensor([float(z)]), qmin, qmax, 1.0).square().sum().backward()
        torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-5)
        assert torch.equal(xa.grad, xb.grad)
    s = torch.rand(6, generator=g).add(0.1).requires_grad_(True)  # per channel: one gradient per scale
    fake_quantize(x, s, torch.zeros(6, dtype=torch.int32), -8, 7, axis=0).sum().backward()
    s_ref = s.detach().clone().requires_grad_(True)
    torch._fake_quantize_learnable_per_channel_affine(x, s_ref, torch.zeros(6), 0, -8, 7, 1.0).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(qmin=7, qmax=7), "qmin"),
    (dict(qmin=8, qmax=7), "qmin"),
    (dict(scale=0.0), "scale"),
    (dict(scale=-1.0), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(zero_point=16), "zero_point"),
    (dict(zero_point=0.5), "zero_point"),
    (dict(x=torch.tensor([1.0, float("nan")])), "x"),
    (dict(x=torch.tensor([1.0, float("inf")])), "x"),
    (dict(x=torch.tensor([1, 2])), "x"),
    (dict(axis=3), "axis"),
    (dict(axis=0, scale=torch.ones(3)), "scale"),
])
def test_fake_quantize_bad_input(kwargs, name):
    args = dict(x=torch.randn(4, 2), scale=0.1, zero_point=3, qmin=0, qmax=15, axis=None) | kwargs
    with pytest.raises(ValueError, match=name):
        fake_quantize(**args)


def test_int_range():
    assert int_range(4, True) == (-8, 7) and int_range(4, False) == (0, 15)
    assert int_range(8, True) == (-128, 127) and int_range(2, False) == (0, 3)
    for bad in (1, 9, 4.0, True, "4"):
        with pytest.raises(ValueError, match=r"bits=.* must be an integer in 2\.\.8"):
            int_range(bad, True)


def test_qparams_from_range():
    s, z = qparams_from_range(torch.tensor([-1.0, 0.5, 0.0]), torch.tensor([3.0, 2.0, 0.0]), 4, False)
    torch.testing.assert_close(s[:2], torch.tensor([4 / 15, 2 / 15]))  # 0 is always in the range
    assert z.tolist()[:2] == [4, 0] and z.dtype == torch.int32
    assert s[2] > 0 and torch.isfinite(s[2])  # all-zero range: floored scale
    s, z = qparams_from_range(-3.0, 1.0, 4, True)
    assert s.item() == pytest.approx(3 / 7) and z.item() == 0


# -------------------------------------------------------------- BN folding
def test_fold_bn_keeps_detector_outputs(detector, images):
    folded = fold_bn(detector)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in detector.modules())  # input untouched
    with torch.no_grad():
        for a, b in zip(_outputs(detector(images)), _outputs(folded(images))):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_fold_bn_sequential_and_frozen_bn():
    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.running_mean.normal_(); frozen.running_var.uniform_(0.5, 2); frozen.weight.uniform_(0.5, 2); frozen.bias.normal_()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _random_bn(nn.Sequential(nn.BatchNorm2d(8)))[0], nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False), frozen).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    assert folded[3].bias is not None
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------- quantized model
def test_quant_config():
    c = QuantConfig()
    assert (c.w_bits, c.a_bits, c.w_symmetric, c.w_per_channel, c.a_symmetric, c.stem_8bit, c.pred_8bit) == (4, 4, True, True, False, True, True)
    assert QuantConfig(**c.to_dict()) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.w_bits = 8
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=9)
    with pytest.raises(ValueError, match="a_bits"):
        QuantConfig(a_bits=1)
    with pytest.raises(ValueError, match="stem_8bit"):
        QuantConfig(stem_8bit="yes")
    assert c.protocol == "ours" and PROTOCOLS == ("ours", "head-fp")
    assert QuantConfig(**QuantConfig(protocol="head-fp").to_dict()).protocol == "head-fp"
    for bad in ("head_fp", None, "Ours"):
        with pytest.raises(ValueError, match=r"protocol=.* is not allowed; allowed: 'ours', 'head-fp'"):
            QuantConfig(protocol=bad)


def test_quantize_model_wraps_every_conv(detector, images):
    qmodel = quantize_model(detector, QuantConfig(w_bits=4, a_bits=6))
    layers = quant_layers(qmodel)
    assert list(layers) == list(detector.conv_names()) and len(layers) == 63
    assert not any(isinstance(m, QuantConv2d) for m in detector.modules())
    eight = {n for n, m in layers.items() if (m.weight_quantizer.bits, m.input_quantizer.bits) == (8, 8)}
    assert eight == {"backbone.stem.conv"} | {n for n in layers if n.endswith(".pred")}
    assert all((m.weight_quantizer.bits, m.input_quantizer.bits) == (4, 6) for n, m in layers.items() if n not in eight)
    body = layers["backbone.c2f2.cv1.conv"]
    assert body.weight_quantizer.axis == 0 and body.weight_quantizer.symmetric
    assert body.input_quantizer.axis is None and not body.input_quantizer.symmetric
    plain = quantize_model(detector, QuantConfig(stem_8bit=False, pred_8bit=False))
    assert all(m.weight_quantizer.bits == 4 for m in quant_layers(plain).values())
    with pytest.raises(RuntimeError, match="calibrate"):  # enabled but not calibrated
        qmodel(images)
    set_quant_state(qmodel, weights=False, acts=False)
    with torch.no_grad():
        for a, b in zip(_outputs(fold_bn(detector)(images)), _outputs(qmodel(images))):
            assert torch.equal(a, b)
        cache = qmodel.capture(images, "neck.td3")  # the unit program still works
        for a, b in zip(_outputs(qmodel.forward_from("neck.td3", cache)), _outputs(qmodel(images))):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(qmodel)


def test_quantize_model_head_fp_leaves_exactly_the_head_convs_fp(detector, images):
    qmodel = quantize_model(detector, QuantConfig(w_bits=4, a_bits=4, protocol="head-fp"))
    head = [n for n in detector.conv_names() if n.startswith("head.")]
    assert head_convs(detector) == tuple(head) and len(head) == 18  # two 3x3 and the pred conv of six branches
    fp_convs = [n for n, m in qmodel.named_modules() if type(m) is nn.Conv2d and not isinstance(
        qmodel.get_submodule(n.rpartition(".")[0]), QuantConv2d)]
    assert fp_convs == head  # every head conv a plain nn.Conv2d, every other conv wrapped
    layers = quant_layers(qmodel)
    assert list(layers) == [n for n in detector.conv_names() if n not in head] and len(layers) == 45
    eight = {n for n, m in layers.items() if (m.weight_quantizer.bits, m.input_quantizer.bits) == (8, 8)}
    assert eight == {"backbone.stem.conv"}  # the stem stays W8A8; pred_8bit has no quantized pred conv left
    assert all(q.weight_quantizer.bits == 4 for q in quant_layers(quantize_model(
        detector, QuantConfig(protocol="head-fp", stem_8bit=False))).values())
    # the head is the BN-folded FP head: run on the quantized neck's outputs, it gives the quantized model's outputs
    calibrate_minmax(qmodel, images)
    first = detector.head_units()[0]
    with torch.no_grad():
        out = qmodel(images)
        again = fold_bn(detector).forward_from(first, qmodel.capture(images, first))
        for a, b in zip(_outputs(out), _outputs(again)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="protocol='head-fp' needs the model's head units.*not a UnitDetector"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), QuantConfig(protocol="head-fp"))


def test_quantize_model_generic_model_and_pred_names():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)).eval()
    q = quantize_model(model, pred_names=["4"])
    bits = {n: m.weight_quantizer.bits for n, m in quant_layers(q).items()}
    assert bits == {"0": 8, "3": 4, "4": 8}
    with pytest.raises(ValueError, match="pred_names"):
        quantize_model(model, pred_names=["nope"])
    with pytest.raises(ValueError, match="config"):
        quantize_model(model, {"w_bits": 4})


def test_set_quant_state_per_layer_and_kind(detector, images):
    qmodel = calibrate_minmax(quantize_model(detector), images)
    layers = quant_layers(qmodel)
    set_quant_state(qmodel, weights=False, acts=False)
    with torch.no_grad():
        fp = _outputs(qmodel(images))
        set_quant_state(qmodel, weights=True, layers=["backbone.down2.conv"])
        w_only = _outputs(qmodel(images))
    on = {n for n, m in layers.items() if m.weight_quantizer.enabled or m.input_quantizer.enabled}
    assert on == {"backbone.down2.conv"} and not layers["backbone.down2.conv"].input_quantizer.enabled
    assert any(not torch.equal(a, b) for a, b in zip(fp, w_only))
    set_quant_state(qmodel, acts=True, layers="neck.down3.conv")
    assert layers["neck.down3.conv"].input_quantizer.enabled and not layers["neck.down3.conv"].weight_quantizer.enabled
    set_quant_state(qmodel, weights=True, acts=True)
    assert all(m.weight_quantizer.enabled and m.input_quantizer.enabled for m in layers.values())
    with pytest.raises(ValueError, match="layers"):
        set_quant_state(qmodel, weights=True, layers=["backbone.stem"])
    with pytest.raises(ValueError, match="weights"):
        set_quant_state(qmodel, weights=1)
    with pytest.raises(ValueError, match="quantize_model"):
        set_quant_state(detector, weights=True)


def test_calibrate_minmax(detector, images):
    qmodel = quantize_model(detector, QuantConfig(w_bits=8, a_bits=8))
    calibrate_minmax(qmodel, images)
    layers = quant_layers(qmodel)
    conv = layers["backbone.c2f1.cv1.conv"]
    w = conv.conv.weight.detach()
    torch.testing.assert_close(conv.weight_quantizer.scale, w.abs().amax((1, 2, 3)) / 127)
    assert (conv.weight_quantizer.zero_point == 0).all()
    with torch.no_grad():
        fp = fold_bn(detector)
        acts = collect_activations(fp, images, ["backbone.c2f1.cv1.conv"], max_elements=2**30)["backbone.c2f1.cv1.conv"]
    lo, hi = min(acts.min().item(), 0.0), max(acts.max().item(), 0.0)
    iq = conv.input_quantizer
    assert iq.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert iq.zero_point.item() == round(-lo / iq.scale.item())
    stem = layers["backbone.stem.conv"].input_quantizer  # images in [0, 1]
    assert stem.zero_point.item() == 0 and stem.scale.item() == pytest.approx(images.max().item() / 255, rel=1e-6)
    with torch.no_grad():  # W8A8 stays close to FP
        for a, b in zip(_outputs(fp(images)), _outputs(qmodel(images))):
            assert (a - b).abs().max() <= 0.05 * a.abs().max() + 1e-3


def test_collect_activations_bounded_and_seeded(detector, images):
    names = ["backbone.stem.conv", "neck.td4.cv1.conv"]
    full = collect_activations(detector, images, names, max_elements=2**30, batch_size=3)
    assert full["backbone.stem.conv"].numel() == images.numel()
    torch.testing.assert_close(full["backbone.stem.conv"].sort().values, images.flatten().sort().values)
    small = collect_activations(detector, images, names, max_elements=1000, seed=0, batch_size=3)
    for n in names:
        x = small[n]
        assert x.numel() == 1000 and x.dim() == 1
        assert x.min() == full[n].min() and x.max() == full[n].max()  # the extremes are always kept
        assert torch.isin(x, full[n]).all()  # values of the data, not made up
    again = collect_activations(detector, images, names, max_elements=1000, seed=0, batch_size=3)
    other = collect_activations(detector, images, names, max_elements=1000, seed=1, batch_size=3)
    assert all(torch.equal(small[n], again[n]) for n in names)
    assert not torch.equal(small["neck.td4.cv1.conv"], other["neck.td4.cv1.conv"])
    assert len(collect_activations(detector, images[:1], max_elements=64)) == 63
    with pytest.raises(ValueError, match="empty"):
        collect_activations(detector, images[:0], names)
    with pytest.raises(ValueError, match="layers"):
        collect_activations(detector, images, ["backbone.stem"])
    with pytest.raises(ValueError, match="max_elements"):
        collect_activations(detector, images, names, max_elements=0)


def test_quantizer_module():
    q = Quantizer(4, symmetric=True, axis=0, channels=3)
    assert q.scale.shape == (3,) and (q.qmin, q.qmax) == (-8, 7)
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="calibrate"):
        q(x)
    q.enabled = False
    assert q(x) is x
    q.enabled = True
    q.set_qparams(torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3, dtype=torch.int32))
    assert torch.equal(q(x), fake_quantize(x, torch.tensor([0.1, 0.2, 0.3]), torch.zeros(3), -8, 7, axis=0))
    assert set(q.state_dict()) == {"scale", "zero_point", "calibrated"}
    with pytest.raises(ValueError, match="shape"):
        q.set_qparams(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="zero_point"):
        q.set_qparams(torch.ones(3), torch.full((3,), 9))
    with pytest.raises(ValueError, match="bits"):
        Quantizer(9)
    with pytest.raises(ValueError, match="axis"):
        Quantizer(4, axis=1)
    q.scale = nn.Parameter(q.scale.clone())  # a learnable scale gets gradients
    q(x).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == (3,)
