"""QDrop: the mixed fake quantizer's forward and gradients, the pool of keep masks, the input mix, the activation
quantizer with a learnable step size, and swapping it in and out of a layer."""

import math

import pytest
import torch
from torch import nn

from detptq_mini import qdrop
from detptq_mini.qdrop import InputMix, MaskPool, QDropQuantizer, mixed_fake_quantize
from detptq_mini.quant import QuantConv2d, Quantizer, fake_quantize, qparams_from_range
from detptq_mini.reconstruction import ReconConfig, reconstruct_unit

S, Z, QMIN, QMAX = 0.3, 3.0, 0, 15


def _x(seed=1, shape=(4, 5, 6, 7)):
    torch.manual_seed(seed)
    return (torch.randn(shape) * 2).contiguous(memory_format=torch.channels_last)  # some values out of range


def _keep(x, prob=0.5, seed=2):
    return (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) < prob).float()


def _quantizer(lo=-1.0, hi=3.0, bits=4):
    q = Quantizer(bits, False)
    q.set_qparams(*qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, False))
    return q


# ------------------------------------------------------------------ mixed_fake_quantize
@pytest.mark.parametrize("with_keep", [False, True])
def test_mixed_fake_quantize_matches_fake_quantize_forward_and_gradients(with_keep):
    x = _x()
    keep = _keep(x) if with_keep else None
    grad = torch.randn(x.shape)
    results = []
    for mixed in (True, False):
        xi = x.clone().requires_grad_(True)
        s = torch.tensor(S, requires_grad=True)
        if mixed:
            out = mixed_fake_quantize(xi, s, Z, QMIN, QMAX, keep, 0.25)
        else:
            out = fake_quantize(xi, s, torch.tensor(Z), QMIN, QMAX)
            out = out if keep is None else torch.where(keep.bool(), out, xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, s.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = results
    assert torch.equal(o1, o2)  # bit for bit: the same sequence of float operations
    assert torch.equal(gx1, gx2)
    assert gs1.item() == pytest.approx(0.25 * gs2.item(), rel=1e-5)  # the LSQ gradient, scaled by grad_factor
    assert o1.is_contiguous(memory_format=torch.channels_last)


def test_mixed_fake_quantize_is_fake_quantize_where_kept_and_x_where_dropped():
    x = _x()
    keep = _keep(x)
    assert 0 < keep.mean() < 1
    out = mixed_fake_quantize(x, torch.tensor(S), Z, QMIN, QMAX, keep)
    x_hat = fake_quantize(x, S, int(Z), QMIN, QMAX)
    kept = keep.bool()
    assert torch.equal(out[kept], x_hat[kept])
    assert torch.equal(out[~kept], x[~kept])
    assert torch.equal(mixed_fake_quantize(x, torch.tensor(S), Z, QMIN, QMAX), x_hat)  # keep=None: every element
    assert torch.equal(mixed_fake_quantize(x, torch.tensor(S), Z, QMIN, QMAX, torch.ones_like(x)), x_hat)
    assert torch.equal(mixed_fake_quantize(x, torch.tensor(S), Z, QMIN, QMAX, torch.zeros_like(x)), x)


def test_mixed_fake_quantize_gradients_ste_identity_and_step_size():
    x = _x()
    keep = _keep(x)
    grad = torch.randn(x.shape)
    xi = x.clone().requires_grad_(True)
    s = torch.tensor(S, requires_grad=True)
    mixed_fake_quantize(xi, s, Z, QMIN, QMAX, keep, 0.5).backward(grad)
    t = x * (1.0 / S)
    q = torch.round(t) + Z
    inside = (q >= QMIN) & (q <= QMAX)
    kept = keep.bool()
    # x: the clipped STE where kept (1 inside the range, 0 outside), the identity where dropped
    assert torch.equal(xi.grad, torch.where(kept, grad * inside.float(), grad))
    assert (xi.grad[kept & ~inside] == 0).all() and bool((kept & ~inside).any())
    # the step size: LSQ's d x_hat / d s (round(x/s) - x/s inside, clamp(q) - z outside), kept elements only
    ds = torch.where(inside, torch.round(t) - t, q.clamp(QMIN, QMAX) - Z)
    expected = 0.5 * (grad * ds * keep).sum()
    assert s.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    # no gradient asked for the step size: none computed
    xi2 = x.clone().requires_grad_(True)
    mixed_fake_quantize(xi2, torch.tensor(S), Z, QMIN, QMAX, keep).backward(grad)
    assert torch.equal(xi2.grad, xi.grad)


# ------------------------------------------------------------------ MaskPool
@pytest.mark.parametrize("prob", [0.3, 0.5, 0.9])
def test_mask_pool_keep_rate_is_quant_prob(prob):
    size, draws = 64, 50
    pool = MaskPool(prob, torch.Generator().manual_seed(0), size=size)
    x = torch.zeros(32, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    masks = torch.stack([pool(x) for _ in range(draws)])
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[0].shape == x.shape and masks[0].dtype == x.dtype
    assert masks[0].is_contiguous(memory_format=torch.channels_last)
    # the draws reuse the pool's masks: the independent Bernoulli draws are the pool's size * features elements
    n = size * x[0].numel()
    std = math.sqrt(prob * (1 - prob) / n)
    assert abs(pool.pool.mean().item() - prob) < 5 * std
    # the mean over T picked masks: variance p (1 - p) / features * (1/size + 1/T) (random picks with replacement)
    picks = draws * x.shape[0]
    std = math.sqrt(prob * (1 - prob) / x[0].numel() * (1 / size + 1 / picks))
    assert abs(masks.mean().item() - prob) < 5 * std
    assert not torch.equal(masks[0], masks[1])  # a new pairing of samples and masks each call


def test_mask_pool_is_drawn_once_per_shape_and_dtype():
    pool = MaskPool(0.5, torch.Generator().manual_seed(0), size=8)
    x = torch.zeros(4, 3, 5, 5)
    pool(x)
    first = pool.pool
    pool(x)
    assert pool.pool is first
    pool(torch.zeros(4, 3, 6, 6))
    assert pool.pool is not first and pool.pool.shape == (8, 3, 6, 6)
    pool(torch.zeros(4, 3, 6, 6, dtype=torch.float64))
    assert pool.pool.dtype == torch.float64
    assert pool(torch.zeros(2, 7)).shape == (2, 7)


def test_masks_are_deterministic_under_a_fixed_generator():
    x = torch.zeros(16, 4, 8, 8)

    def draws(seed):
        pool = MaskPool(0.5, torch.Generator().manual_seed(seed), size=16)
        return [pool(x) for _ in range(3)]

    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))

    q, y = _quantizer(), _x()

    def quantized(seed):
        qd = QDropQuantizer(q, 0.5, torch.Generator().manual_seed(seed))
        return [qd(y) for _ in range(3)]

    assert all(torch.equal(u, v) for u, v in zip(quantized(3), quantized(3)))
    assert not all(torch.equal(u, v) for u, v in zip(quantized(3), quantized(4)))


# ------------------------------------------------------------------ InputMix
def test_input_mix_takes_the_quantized_input_with_probability_prob():
    x_q, x_fp = torch.full((64, 4, 8, 8), 1.0), torch.full((64, 4, 8, 8), -1.0)
    idx = torch.arange(0, 64, 2)
    mix = InputMix(0.5, torch.Generator().manual_seed(0), size=32)
    out = mix(x_q, x_fp, idx)
    assert out.shape == (32, 4, 8, 8)
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    std = math.sqrt(0.25 / (4 * 8 * 8) * (1 / 32 + 1 / 32))  # 32 masks picked from a pool of 32 (see above)
    assert abs((out == 1).float().mean().item() - 0.5) < 5 * std
    assert (x_q == 1).all() and (x_fp == -1).all()  # the inputs are not modified
    # element-wise: x_q where kept, x_fp elsewhere, for any values
    a, b = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    out = InputMix(0.5, torch.Generator().manual_seed(0), size=32)(a, b, idx)
    assert ((out == a[idx]) | (out == b[idx])).all()
    assert bool((out == a[idx]).any()) and bool((out == b[idx]).any())


def test_input_mix_with_prob_one_is_the_quantized_input_and_draws_nothing():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    x_q, x_fp = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    idx = torch.tensor([3, 1, 4])
    assert torch.equal(InputMix(1.0, gen)(x_q, x_fp, idx), x_q[idx])
    assert torch.equal(gen.get_state(), state)


# ------------------------------------------------------------------ QDropQuantizer
def test_quant_prob_one_is_plain_fake_quantization():
    q, x = _quantizer(), _x()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    qd = QDropQuantizer(q, 1.0, gen)
    for _ in range(3):
        assert torch.equal(qd(x), fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax))
    assert torch.equal(gen.get_state(), state)  # no mask drawn
    qd.drop = False  # the switch that turns the masks off at any quant_prob
    half = QDropQuantizer(q, 0.5, gen)
    half.drop = False
    assert torch.equal(half(x), fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax))


def test_qdrop_quantizer_learns_a_scale_and_writes_it_back():
    q = _quantizer()
    qd = QDropQuantizer(q, 1.0, torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, 4, 4) * 2
    assert torch.equal(qd(x), fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax))
    (qd(x) - x).square().sum().backward()
    assert qd.scale.grad is not None and qd.scale.grad.item() != 0
    with torch.no_grad():
        qd.scale.mul_(1.5)
    qd.finish()
    assert q.scale.item() == pytest.approx(1.5 * 4 / 15)
    assert qd.masks.pool is None
    q.enabled = False
    assert qd(x) is x
    half = QDropQuantizer(q, 0.5, torch.Generator().manual_seed(0))
    q.enabled = True
    out = half(x)
    quantized = out == fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax)
    assert 0.3 < (quantized & (out != x)).float().mean().item() < 0.7
    with pytest.raises(ValueError, match="per-tensor"):
        QDropQuantizer(Quantizer(4, True, 0, 3), 0.5, None)


def test_qdrop_quantizer_step_size_gradient_is_lsq_scaled():
    q, x = _quantizer(), _x()
    qd = QDropQuantizer(q, 1.0, None)
    grad = torch.randn(x.shape)
    qd(x).backward(grad)
    s = q.scale.detach().clone().requires_grad_(True)
    fake_quantize(x, s, q.zero_point, q.qmin, q.qmax).backward(grad)
    g = 1.0 / math.sqrt(x[0].numel() * q.qmax)
    assert qd.scale.grad.item() == pytest.approx(g * s.grad.item(), rel=1e-5)
    fixed = QDropQuantizer(q, 1.0, None, learn_scale=False)
    assert not isinstance(fixed.scale, nn.Parameter) and "scale" in dict(fixed.named_buffers())


# ------------------------------------------------------------------ attach / finish
def test_attach_and_finish_swap_the_input_quantizer():
    torch.manual_seed(0)
    layer = QuantConv2d(nn.Conv2d(3, 4, 3, padding=1), w_bits=4, a_bits=4)
    original = layer.input_quantizer
    original.set_qparams(*qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0), 4, False))
    drop = qdrop.attach(layer, 0.5, torch.Generator().manual_seed(0), learn_scale=True)
    assert layer.input_quantizer is drop and drop.inner is original
    with pytest.raises(ValueError, match="already has a QDropQuantizer"):
        qdrop.attach(layer, 0.5, None)
    with torch.no_grad():
        drop.scale.mul_(2.0)
    qdrop.finish(layer)
    assert layer.input_quantizer is original
    assert original.scale.item() == pytest.approx(2 * 3 / 15)
    with pytest.raises(ValueError, match="no QDropQuantizer"):
        qdrop.finish(layer)
    with pytest.raises(ValueError, match="QuantConv2d"):
        qdrop.attach(nn.Conv2d(3, 4, 1), 0.5, None)


# ------------------------------------------------------------------ fresh masks and the input coin (the reference's)
@pytest.mark.parametrize("prob", [0.25, 0.5, 0.9, 1.0])
def test_draw_keep_rate_is_prob_and_fresh_every_call(prob):
    gen = torch.Generator().manual_seed(0)
    a = qdrop.draw_keep(64, 1000, prob, gen)
    b = qdrop.draw_keep(64, 1000, prob, gen)
    assert a.shape == (64, 1000) and a.dtype == torch.float32
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert a.mean().item() == pytest.approx(prob, abs=0.005)  # 64,000 draws: std of the mean <= 0.002
    if prob < 1:
        assert not torch.equal(a, b)  # fresh numbers, no pool
        # no structure across samples or elements: rows and columns are independent draws
        assert a.mean(1).std().item() == pytest.approx(math.sqrt(prob * (1 - prob) / 1000), rel=0.3)
    assert torch.equal(qdrop.draw_keep(4, 7, prob, torch.Generator().manual_seed(3)),
                       qdrop.draw_keep(4, 7, prob, torch.Generator().manual_seed(3)))


def _const_layer(cin, cout, step=0.3):
    layer = QuantConv2d(nn.Conv2d(cin, cout, 1), w_bits=4, a_bits=4)
    layer.weight_quantizer.set_qparams(torch.full((cout,), 0.05), torch.zeros(cout, dtype=torch.int32))
    layer.input_quantizer.set_qparams(torch.tensor(step), torch.tensor(0, dtype=torch.int32))
    return layer


def _spy(layer, seen, name):
    """Record what the conv itself receives (after the input quantizer), call by call."""
    conv_forward = layer.conv._conv_forward

    def record(x, w, b):
        seen.setdefault(name, []).append(x.detach().clone())
        return conv_forward(x, w, b)
    layer.conv._conv_forward = record


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


X_Q, X_FP, STEP = 0.44, 0.61, 0.3  # neither on the grid of step 0.3: Q(x_q) = 0.3, Q(x_fp) = 0.6


@pytest.mark.parametrize("prob", [0.5, 0.8, 1.0])
def test_one_coin_conv_sees_quantized_prefix_input_quantized_or_fp_input_in_float(prob):
    """The reference's coin: the conv's training-step input is Q(x_q) with probability quant_prob and x_fp
    otherwise, never x_q unquantized nor Q(x_fp)."""
    layer, seen = _const_layer(4, 4), {}
    _spy(layer, seen, "conv")
    n = 32
    x_q, x_fp = _cl(torch.full((n, 4, 8, 8), X_Q)), _cl(torch.full((n, 4, 8, 8), X_FP))
    cfg = ReconConfig(iters=6, batch_size=16, quant_prob=prob, lr_act=0.0)  # fixed step: Q is fixed
    calls_before = 0
    reconstruct_unit(layer, [x_q], [x_fp], torch.zeros(n, 4, 8, 8), config=cfg, name="conv")
    steps = seen["conv"][-7:-1]  # the six training steps (after them: the "after" loss on every sample)
    assert len(seen["conv"]) >= 8 + calls_before
    q_q = fake_quantize(torch.tensor(X_Q), STEP, 0, 0, 15).item()
    values = torch.cat([s.flatten() for s in steps])
    is_qq = values == q_q
    is_fp = values == torch.tensor(X_FP)
    assert bool((is_qq | is_fp).all()), values.unique()
    assert is_qq.float().mean().item() == pytest.approx(prob, abs=0.02)  # 24,576 elements


class _Neck(nn.Module):
    """A neck-like unit: two inputs, a nearest upsampling and a concatenation before the first conv, a computed
    input (SiLU of a conv) before the second."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _const_layer(6, 4), _const_layer(4, 4)

    def forward(self, x1, x2):
        up = torch.nn.functional.interpolate(x1, scale_factor=2, mode="nearest")
        return self.b(torch.nn.functional.silu(self.a(torch.cat([up, x2], 1))))


def test_one_coin_goes_through_shape_only_operations_and_not_into_computed_inputs():
    unit, seen = _Neck(), {}
    _spy(unit.a, seen, "a")
    n = 32
    x_q = [_cl(torch.full((n, 2, 4, 4), X_Q)), _cl(torch.full((n, 4, 8, 8), X_Q))]
    x_fp = [_cl(torch.full((n, 2, 4, 4), X_FP)), _cl(torch.full((n, 4, 8, 8), X_FP))]
    coin = qdrop.InputCoin(unit, {"a": unit.a, "b": unit.b}, x_q, 0.5, torch.Generator().manual_seed(0))
    assert set(coin.maps) == {"a"}  # b reads a computed tensor: it keeps a coin of its own
    (where, src, shape, channels_last, full), = coin.maps["a"]
    assert full and shape == (6, 8, 8) and channels_last
    # the upsampled channels read each source element four times (2x2 nearest)
    assert torch.bincount(src, minlength=2 * 4 * 4 + 4 * 8 * 8)[: 2 * 4 * 4].eq(4).all()
    cfg = ReconConfig(iters=4, batch_size=16, quant_prob=0.5, lr_act=0.0)
    reconstruct_unit(unit, x_q, x_fp, torch.zeros(n, 4, 8, 8), config=cfg, name="neck")
    q_q = fake_quantize(torch.tensor(X_Q), STEP, 0, 0, 15).item()
    for x in seen["a"][-5:-1]:
        assert bool(((x == q_q) | (x == torch.tensor(X_FP))).all())
        up = x[:, :2]  # an upsampled element and its three copies took the same coin
        assert torch.equal(up[:, :, 0::2, 0::2], up[:, :, 1::2, 1::2])


def test_two_coin_ablation_still_mixes_four_states():
    """The earlier scheme (kept as a named ablation): the input mix and the quantizer's own coin are independent,
    so the conv sees Q(x_q), x_q, Q(x_fp) and x_fp."""
    layer, seen = _const_layer(4, 4), {}
    _spy(layer, seen, "conv")
    n = 32
    x_q, x_fp = _cl(torch.full((n, 4, 8, 8), X_Q)), _cl(torch.full((n, 4, 8, 8), X_FP))
    cfg = ReconConfig(iters=4, batch_size=16, quant_prob=0.5, lr_act=0.0, qdrop_input="two-coin")
    reconstruct_unit(layer, [x_q], [x_fp], torch.zeros(n, 4, 8, 8), config=cfg, name="conv")
    values = torch.cat([s.flatten() for s in seen["conv"][-5:-1]])
    states = {round(v, 4) for v in values.unique().tolist()}
    assert states == {0.3, 0.44, 0.6, 0.61}


def test_step_size_pushed_below_zero_recovers():
    """The step size stays positive the reference's way (abs, then at least eps): a step an optimiser pushes below
    zero comes back and keeps learning, where a clamp at a floor would leave it stuck without gradient."""
    q = _quantizer(lo=0.0, hi=3.0, bits=4)
    d = QDropQuantizer(q, 1.0, None)
    x = torch.rand(256, 8) * 3
    target = fake_quantize(x, 0.2, 0, 0, 15)
    opt = torch.optim.SGD([d.scale], lr=1.0)
    with torch.no_grad():
        d.scale.fill_(-0.05)  # pushed below zero
    losses = []
    for _ in range(60):
        loss = (d(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    d(x)
    assert d.scale.item() > 0
    assert losses[-1] < 0.5 * losses[0]
    d.finish()
    assert q.scale.item() > 0 and q.scale.item() == pytest.approx(d.scale.item())
    with torch.no_grad():
        d.scale.fill_(-1e-12)
    d(x)
    assert d.scale.item() == pytest.approx(qdrop.EPS)


class _Shared(nn.Module):
    """One conv applied to two inputs (RetinaNet's head shares its subnet across the levels)."""

    def __init__(self):
        super().__init__()
        self.conv = _const_layer(4, 4)

    def forward(self, x1, x2):
        return torch.cat([self.conv(x1).flatten(2), self.conv(x2).flatten(2)], 2)[..., None]


def test_one_coin_reaches_a_layer_run_once_per_input():
    unit, seen = _Shared(), {}
    _spy(unit.conv, seen, "conv")
    n = 32
    x_q = [_cl(torch.full((n, 4, 8, 8), X_Q)), _cl(torch.full((n, 4, 4, 4), X_Q))]
    x_fp = [_cl(torch.full((n, 4, 8, 8), X_FP)), _cl(torch.full((n, 4, 4, 4), X_FP))]
    coin = qdrop.InputCoin(unit, {"conv": unit.conv}, x_q, 0.5, torch.Generator().manual_seed(0))
    maps = coin.maps["conv"]
    assert [m[2] for m in maps] == [(4, 8, 8), (4, 4, 4)] and all(m[4] for m in maps)
    cfg = ReconConfig(iters=3, batch_size=16, quant_prob=0.5, lr_act=0.0)
    reconstruct_unit(unit, x_q, x_fp, torch.zeros(n, 4, 80, 1), config=cfg, name="shared")
    q_q = fake_quantize(torch.tensor(X_Q), STEP, 0, 0, 15).item()
    steps = seen["conv"][-8:-2]  # three steps of two calls each (then the "after" loss: two calls)
    for x in steps:
        assert bool(((x == q_q) | (x == torch.tensor(X_FP))).all())
        assert 0.3 < (x == q_q).float().mean().item() < 0.7
