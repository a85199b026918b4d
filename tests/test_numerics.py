"""Numerical safety of the quantizer and the Lp search over huge and tiny dynamic ranges (hypothesis).

test_lp.py covers ordinary magnitudes (idempotence, half-step error, Lp <= min-max, per channel <= per tensor,
all-zero / constant channels, a single element); these push the same properties to 1e-30..1e37.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detptq_mini.lp import lp_error, lp_scale_search, minmax_scale
from detptq_mini.quant import fake_quantize, int_range, qparams_from_range

SETTINGS = settings(max_examples=40, deadline=None)
PS = (1.0, 2.0, 2.4, 4.5)  # Gram path (1, 2, 4.5) and pow path (2.4)


@st.composite
def wide(draw):
    """``(C, K)`` with each channel at its own magnitude 10^e, e in -30..37, plus bits, symmetry, axis."""
    c, k = draw(st.integers(1, 4)), draw(st.integers(1, 30))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    exps = torch.tensor(draw(st.lists(st.integers(-30, 37), min_size=c, max_size=c)), dtype=torch.float64)
    x = (torch.randn(c, k, generator=g, dtype=torch.float64) * 10.0 ** exps[:, None]).clamp(-3e38, 3e38).float()
    if draw(st.booleans()):
        x[draw(st.integers(0, c - 1))] = draw(st.sampled_from([0.0, 1.5, -1e-20, 1e30]))  # constant channel
    return x, draw(st.integers(2, 8)), draw(st.booleans()), draw(st.sampled_from([None, 0]))


@SETTINGS
@given(wide())
def test_scales_finite_positive_and_zero_points_in_range(case):
    x, bits, symmetric, axis = case
    qmin, qmax = int_range(bits, symmetric)
    for s, z in [minmax_scale(x, bits, axis, symmetric), *lp_scale_search(x, bits, PS, axis, symmetric, 20).values()]:
        assert torch.isfinite(s).all() and (s > 0).all()
        assert ((z >= qmin) & (z <= qmax)).all()
        out = fake_quantize(x, s, z, qmin, qmax, axis)
        assert torch.isfinite(out).all()


@SETTINGS
@given(wide())
def test_fake_quant_idempotent_and_half_step_error_at_any_magnitude(case):
    x, bits, symmetric, axis = case
    qmin, qmax = int_range(bits, symmetric)
    s, z = minmax_scale(x, bits, axis, symmetric)
    once = fake_quantize(x, s, z, qmin, qmax, axis)
    assert torch.equal(fake_quantize(once, s, z, qmin, qmax, axis), once)
    sc, zc = (s.view(-1, 1), z.view(-1, 1)) if axis == 0 else (s, z)
    inside = (x >= (qmin - zc) * sc) & (x <= (qmax - zc) * sc)
    bound = sc / 2 * (1 + 1e-6) + 4 * torch.finfo(x.dtype).eps * x.abs()
    assert ((x - once).abs()[inside] <= bound.expand_as(x)[inside]).all()


@SETTINGS
@given(wide())
def test_lp_search_not_worse_than_minmax_at_any_magnitude(case):
    x, bits, symmetric, axis = case
    s0, z0 = minmax_scale(x, bits, axis, symmetric)
    for p, (s, z) in lp_scale_search(x, bits, PS, axis, symmetric, 20).items():
        ours, ref = lp_error(x, s, z, bits, p, axis, symmetric), lp_error(x, s0, z0, bits, p, axis, symmetric)
        assert torch.isfinite(ours).all()
        assert (ours <= ref * (1 + 1e-5) + 1e-300).all(), (p, ours, ref)


@SETTINGS
@given(st.integers(1, 60), st.integers(2, 8), st.booleans(), st.sampled_from([None, 0]),
       st.integers(0, 2**31 - 1))
def test_search_is_scale_equivariant_so_huge_ranges_are_searched_not_skipped(half_k, bits, symmetric, axis, seed):
    """Multiplying X by 4^k (exact in floats) multiplies every chosen scale by 4^k: the search at 1e36 picks the
    same candidate as at 1, for every p (a float32 overflow of |e|^p would fall back to min-max instead)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, generator=g) ** 3 + 0.1  # heavy tails: the best p-dependent ratio is not r = 1
    big = x * 4.0**half_k
    small = lp_scale_search(x, bits, PS, axis, symmetric, 30)
    large = lp_scale_search(big, bits, PS, axis, symmetric, 30)
    for p in PS:
        assert torch.equal(large[p][0], small[p][0] * 4.0**half_k), p
        assert torch.equal(large[p][1], small[p][1]), p


def test_qparams_from_range_rejects_non_finite_ends():
    import pytest

    for lo, hi in ((float("nan"), 1.0), (-1.0, float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            qparams_from_range(lo, hi, 8, False)
