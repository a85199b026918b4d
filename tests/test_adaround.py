"""AdaRound primitives: the rectified sigmoid, V's initialisation, the regulariser, the beta schedule, and
swapping an AdaRoundQuantizer in and out of a layer."""

import math

import pytest
import torch
from torch import nn

from detptq_mini import adaround
from detptq_mini.adaround import (AdaRoundQuantizer, attach, beta_at, finish, init_v, rectified_sigmoid,
                                  round_regularizer)
from detptq_mini.quant import QuantConv2d, Quantizer, fake_quantize, qparams_from_range


def _layer(bits=4, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    layer = QuantConv2d(conv, w_bits=bits, a_bits=8)
    w = conv.weight.detach().reshape(6, -1)
    layer.weight_quantizer.set_qparams(*qparams_from_range(w.amin(1), w.amax(1), bits, True))
    layer.input_quantizer.set_qparams(*qparams_from_range(torch.tensor(-3.0), torch.tensor(3.0), 8, False))
    return layer


def test_rectified_sigmoid_reaches_exactly_0_and_1():
    v = torch.tensor([-50.0, -3.0, 0.0, 3.0, 50.0])
    h = rectified_sigmoid(v)
    assert h[0] == 0 and h[-1] == 1 and h[2] == pytest.approx(0.5)
    assert (h >= 0).all() and (h <= 1).all() and (h.diff() >= 0).all()


def test_init_v_inverts_the_rectified_sigmoid():
    frac = torch.linspace(0, 0.999, 101)
    assert torch.allclose(rectified_sigmoid(init_v(frac)), frac, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        init_v(torch.tensor([1.0]))


def test_soft_weight_starts_at_the_fp_weight_and_hard_at_round_to_nearest():
    layer = _layer()
    w = layer.conv.weight.detach()
    ada = AdaRoundQuantizer(layer.weight_quantizer, w)
    inside = (w.abs() <= ada.scale * ada.qmax)
    assert torch.allclose(ada()[inside], w[inside], atol=1e-6)
    rtn = fake_quantize(w, layer.weight_quantizer.scale, layer.weight_quantizer.zero_point, ada.qmin, ada.qmax, 0)
    ratio = w / ada.scale
    tie = (ratio - ratio.floor() - 0.5).abs() < 1e-4  # half-to-even vs round-half-up: only exact ties differ
    assert torch.equal(ada.hard_weight()[~tie], rtn[~tie])
    ada.soft = False
    assert torch.equal(ada(), ada.hard_weight())


def test_hard_weight_is_on_the_grid_whatever_v():
    layer = _layer(bits=3)
    ada = AdaRoundQuantizer(layer.weight_quantizer, layer.conv.weight)
    with torch.no_grad():
        ada.v.normal_(0, 5)
    hard = ada.hard_weight()
    q = layer.weight_quantizer
    again = fake_quantize(hard, q.scale, q.zero_point, q.qmin, q.qmax, 0)
    assert torch.equal(again, hard)
    # each weight moved by at most one step from round-to-nearest's neighbour: floor or ceil of W / s
    ratio = layer.conv.weight.detach() * (1.0 / ada.scale)
    k = hard * (1.0 / ada.scale)
    assert ((k - ratio.floor().clamp(q.qmin, q.qmax)).abs() < 1e-4).logical_or(
        (k - ratio.ceil().clamp(q.qmin, q.qmax)).abs() < 1e-4).all()


def test_regulariser_is_zero_at_hard_values_and_one_per_weight_at_half():
    assert round_regularizer(torch.tensor([-40.0, 40.0]), 2.0).item() == pytest.approx(0.0)
    assert round_regularizer(torch.zeros(10), 2.0).item() == pytest.approx(10.0)
    v = torch.linspace(-4, 4, 9)
    assert round_regularizer(v, 20.0) > round_regularizer(v, 2.0)  # high beta: flat, near 1 everywhere
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="beta"):
            round_regularizer(v, bad)


def test_beta_schedule_warmup_then_linear_from_20_to_2():
    iters = 100
    betas = [beta_at(i, iters) for i in range(iters)]
    assert all(b is None for b in betas[:20]) and betas[20] == pytest.approx(20.0)
    assert betas[-1] == pytest.approx(2.0)
    after = betas[20:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert betas[60] == pytest.approx(2 + 18 * (1 - 40 / 79))
    with pytest.raises(ValueError, match="iters"):
        beta_at(0, 0)
    with pytest.raises(ValueError, match="warmup"):
        beta_at(0, 10, warmup=1.0)


def test_attach_and_finish_swap_the_quantizer_and_write_hard_weights():
    layer = _layer()
    original = layer.weight_quantizer
    ada = attach(layer)
    assert layer.weight_quantizer is ada and isinstance(layer._rtn_quantizer, Quantizer)
    with pytest.raises(ValueError, match="already"):
        attach(layer)
    with torch.no_grad():
        ada.v.fill_(-10.0)  # round every weight down
    hard = ada.hard_weight()
    flipped = finish(layer)
    assert layer.weight_quantizer is original and not hasattr(layer, "_rtn_quantizer")
    assert torch.equal(layer.conv.weight, hard)
    assert not any(isinstance(m, AdaRoundQuantizer) for m in layer.modules())
    # rounding every weight down differs from nearest exactly where the fractional part is >= 0.5 (in range)
    assert flipped > 0
    with pytest.raises(ValueError, match="no AdaRoundQuantizer"):
        finish(layer)


def test_attach_needs_a_calibrated_quantized_layer():
    with pytest.raises(ValueError, match="QuantConv2d"):
        attach(nn.Conv2d(2, 2, 1))
    layer = QuantConv2d(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="calibrated"):
        attach(layer)


def test_constants_are_the_papers():
    assert adaround.ZETA == 1.1 and adaround.GAMMA == -0.1
    assert math.isclose(rectified_sigmoid(torch.tensor(0.0)).item(), 0.5)
