"""detptq_mini.lp: the Lp metric and the scale search (method page, section 3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detptq_mini import lp
from detptq_mini.lp import P_DEFAULT, lp_error, lp_scale_search, lp_sweep, minmax_scale
from detptq_mini.quant import fake_quantize, int_range

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def tensors(draw, min_channels=1):
    """A small tensor ``(C, K)`` of varied distributions, with its bits, symmetry and axis."""
    c = draw(st.integers(min_channels, 4))
    k = draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "heavy", "relu", "uniform", "ints"]))
    x = {"normal": lambda: torch.randn(c, k, generator=g),
         "heavy": lambda: torch.randn(c, k, generator=g) ** 3 * 5,
         "relu": lambda: torch.randn(c, k, generator=g).relu() * 3,
         "uniform": lambda: torch.rand(c, k, generator=g) - 0.3,
         "ints": lambda: torch.randint(-3, 4, (c, k), generator=g).float()}[kind]()
    x = x * 10 ** draw(st.integers(-3, 3))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    axis = draw(st.sampled_from([None, 0]))
    return x, bits, symmetric, axis


def _qrange(bits, symmetric):
    return int_range(bits, symmetric)


@SETTINGS
@given(tensors(), st.integers(1, 30))
def test_search_never_worse_than_minmax_in_its_own_metric(case, grid):
    x, bits, symmetric, axis = case
    best = lp_scale_search(x, bits, P_DEFAULT + (0.7,), axis, symmetric, grid)
    s0, z0 = minmax_scale(x, bits, axis, symmetric)
    for p, (s, z) in best.items():
        ours = lp_error(x, s, z, bits, p, axis, symmetric)
        ref = lp_error(x, s0, z0, bits, p, axis, symmetric)
        assert (ours <= ref * (1 + 1e-5) + 1e-300).all(), (p, ours, ref)


@SETTINGS
@given(tensors())
def test_sweep_errors_equal_the_metric_and_search_takes_their_minimum(case):
    x, bits, symmetric, axis = case
    ps = (1.0, 2.4, 4.5)  # Gram path and pow path
    sw = lp_sweep(x, bits, ps, axis, symmetric, grid=12)
    ref = torch.stack([torch.stack([lp_error(x, sw.scale[g], sw.zero_point[g], bits, p, axis, symmetric)
                                    for g in range(12)]) for p in ps])
    torch.testing.assert_close(sw.error, ref, rtol=1e-5, atol=1e-30)
    assert torch.equal(sw.scale[-1], minmax_scale(x, bits, axis, symmetric)[0])  # r = 1 is min-max
    for k, (p, (s, z)) in enumerate(sw.best().items()):
        chosen = lp_error(x, s, z, bits, p, axis, symmetric)
        assert (chosen <= ref[k].min(0).values * (1 + 1e-5) + 1e-300).all()


def test_candidates_follow_method_section_3():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.3, -0.2, 0.1]])
    sw = lp_sweep(x, 4, (2.0,), axis=0, symmetric=True, grid=4)
    amax = torch.tensor([2.0, 0.3])
    for i in range(4):
        torch.testing.assert_close(sw.scale[i], (i + 1) / 4 * amax / 7)
    assert (sw.zero_point == 0).all()
    a = torch.tensor([-1.0, 3.0, 0.5])
    sw = lp_sweep(a, 3, (2.0,), grid=2)
    for i, r in enumerate((0.5, 1.0)):
        s = (r * 3.0 + r * 1.0) / 7
        assert sw.scale[i].item() == pytest.approx(s, rel=1e-6)
        assert sw.zero_point[i].item() == round(r * 1.0 / s)
    assert sw.error.shape == (1, 2) and sw.ratios.tolist() == [0.5, 1.0]


def test_small_p_clips_large_p_protects_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g), torch.tensor([40.0, -35.0])])
    best = lp_scale_search(x, 4, (1.0, 4.5), symmetric=True)
    assert best[1.0][0] < best[4.5][0] < minmax_scale(x, 4, symmetric=True)[0] * 1.0001


@SETTINGS
@given(tensors())
def test_fake_quant_idempotent_and_error_at_most_half_a_step_inside_the_range(case):
    x, bits, symmetric, axis = case
    qmin, qmax = _qrange(bits, symmetric)
    for s, z in list(lp_scale_search(x, bits, (1.0, 3.0), axis, symmetric, grid=10).values()) + [minmax_scale(x, bits, axis, symmetric)]:
        once = fake_quantize(x, s, z, qmin, qmax, axis)
        assert torch.equal(fake_quantize(once, s, z, qmin, qmax, axis), once)
        sc = s.view(-1, 1) if axis == 0 else s
        zc = z.view(-1, 1) if axis == 0 else z
        inside = (x >= (qmin - zc) * sc) & (x <= (qmax - zc) * sc)
        err = (x - once).abs()
        bound = sc / 2 * (1 + 1e-6) + 4 * torch.finfo(x.dtype).eps * x.abs()  # float rounding of x - x_hat
        assert (err[inside] <= bound[inside]).all()


@SETTINGS
@given(tensors(min_channels=2), st.sampled_from(P_DEFAULT))
def test_per_channel_error_at_most_per_tensor(case, p):
    """When every channel reaches the tensor's range the candidate grids coincide, so per channel can only win."""
    x, bits, symmetric, _ = case
    x = x.clone()
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    x[:, 0], x[:, -1] = lo, hi  # every channel spans [lo, hi]
    per_tensor = lp_scale_search(x, bits, (p,), None, symmetric, grid=20)[p]
    per_channel = lp_scale_search(x, bits, (p,), 0, symmetric, grid=20)[p]
    e_t = lp_error(x, *per_tensor, bits, p, None, symmetric)
    e_c = lp_error(x, *per_channel, bits, p, 0, symmetric).mean()
    assert e_c <= e_t * (1 + 1e-5) + 1e-300


def test_per_channel_beats_per_tensor_on_weights_with_varied_ranges():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-2, 0, 16).view(-1, 1, 1, 1)
    for p in (2.0, 4.0):
        e_c = lp_error(w, *lp_scale_search(w, 4, (p,), 0, True)[p], 4, p, 0, True).mean()
        e_t = lp_error(w, *lp_scale_search(w, 4, (p,), None, True)[p], 4, p, None, True)
        assert e_c < 0.5 * e_t


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_and_constant_channels(symmetric):
    x = torch.stack([torch.zeros(9), torch.full((9,), 2.5), torch.full((9,), -1e-3), torch.linspace(-1, 1, 9)])
    qmin, qmax = _qrange(4, symmetric)
    results = list(lp_scale_search(x, 4, P_DEFAULT, 0, symmetric).items()) + [(None, minmax_scale(x, 4, 0, symmetric))]
    results += [(p, sz) for p, sz in lp_scale_search(torch.zeros(5, 3), 4, P_DEFAULT, None, symmetric).items()]
    for p, (s, z) in results:
        assert torch.isfinite(s).all() and (s > 0).all()
        assert ((z >= qmin) & (z <= qmax)).all()
    s, z = lp_scale_search(x, 4, (2.0,), 0, symmetric)[2.0]
    out = fake_quantize(x, s, z, qmin, qmax, 0)
    assert torch.equal(out[0], torch.zeros(9)) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1], x[1])  # a constant is exactly representable at r = 1
    assert torch.isfinite(lp_error(x, s, z, 4, 2.0, 0, symmetric)).all()


def test_single_element():
    for x in (torch.tensor([3.0]), torch.tensor(-2.0), torch.tensor([[0.0]])):
        for axis in (None, 0) if x.dim() else (None,):
            best = lp_scale_search(x, 4, P_DEFAULT, axis, symmetric=False)
            for p, (s, z) in best.items():
                assert torch.isfinite(s).all() and (s > 0).all()
                assert s.shape == (() if axis is None else (1,))
                assert lp_error(x, s, z, 4, p, axis) <= lp_error(x, *minmax_scale(x, 4, axis), 4, p, axis) + 1e-12


def test_chunking_does_not_change_the_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=g).relu()
    ref = lp_sweep(x, 4, P_DEFAULT + (2.4,), axis=0, grid=30)
    monkeypatch.setattr(lp, "_CHUNK", 997)
    monkeypatch.setattr(lp, "_KMAX", 61)
    small = lp_sweep(x, 4, P_DEFAULT + (2.4,), axis=0, grid=30)
    torch.testing.assert_close(small.error, ref.error, rtol=1e-5, atol=0)
    assert torch.equal(small.scale, ref.scale)


def test_shapes_dtypes_and_keys():
    w = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    best = lp_scale_search(w, 4, (1, 2.5, 2.5), axis=0, symmetric=True)
    assert list(best) == [1.0, 2.5]
    s, z = best[2.5]
    assert s.shape == (8,) and s.dtype == torch.float32 and z.dtype == torch.int32 and (z == 0).all()
    s, z = lp_scale_search(torch.rand(2, 3, 4), 8, axis=None)[4.5]
    assert s.shape == () and z.shape == ()
    s, z = lp_scale_search(torch.rand(2, 3, 4), 8, (2.0,), axis=-1)[2.0]
    assert s.shape == (4,)


@pytest.mark.parametrize("kwargs, name", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"),
    (dict(ps=(0.0,)), "ps"), (dict(ps=(-1.0,)), "ps"), (dict(ps=(float("nan"),)), "ps"), (dict(ps=(math.inf,)), "ps"),
    (dict(ps=()), "ps"), (dict(grid=0), "grid"), (dict(grid=2.5), "grid"), (dict(axis=2), "axis"),
    (dict(x=torch.tensor([1.0, float("nan")])), "x"), (dict(x=torch.tensor([float("-inf")])), "x"),
    (dict(x=torch.empty(0)), "x"), (dict(symmetric=None), "symmetric"),
])
def test_bad_input(kwargs, name):
    args = dict(x=torch.randn(3, 4), bits=4, ps=P_DEFAULT, axis=None, symmetric=False, grid=10) | kwargs
    with pytest.raises(ValueError, match=name):
        lp_scale_search(**args)


def test_bad_input_metric_and_minmax():
    x = torch.randn(5)
    s, z = minmax_scale(x, 4)
    for p in (0.0, -2.0, float("nan"), math.inf):
        with pytest.raises(ValueError, match="p="):
            lp_error(x, s, z, 4, p)
    with pytest.raises(ValueError, match="bits"):
        lp_error(x, s, z, 10, 2.0)
    with pytest.raises(ValueError, match="x"):
        minmax_scale(torch.empty(0), 4)


def test_ps_forms():
    x = torch.randn(50)
    assert list(lp_scale_search(x, 4, 2.5)) == [2.5]
    assert list(lp_scale_search(x, 4, [3, 1.5, 3])) == [3.0, 1.5]
    for bad in ("2", [True], [2.0, "a"], None, [float("nan")]):
        with pytest.raises(ValueError, match="ps="):
            lp_scale_search(x, 4, bad)
