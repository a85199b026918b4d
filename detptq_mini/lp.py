"""The Lp metric and the scale search of DetPTQ (method page, section 3).

For a tensor ``X`` (a layer's weights, or a sample of its input activations) and a candidate scale ``s``::

    L_p(s) = mean(|X - Q(X; s)|^p)        s_p* = argmin_s L_p(s)
    p in P = {1, 1.5, ..., 4.5}

``Q`` is :func:`detptq_mini.quant.fake_quantize` (the same kernel, so the scales found are the scales used).
Candidates are the ratios ``r = i / grid``, ``i = 1..grid`` (``r = 1`` is min-max):

* symmetric (weights, per output channel): clip at ``r * max|X_c|``, ``s = clip / (2^(b-1) - 1)``, ``z = 0``;
* asymmetric (activations, per tensor): range ``(r * lo, r * hi)`` with ``lo = min(X.min(), 0)``,
  ``hi = max(X.max(), 0)``, ``s = r (hi - lo) / (2^b - 1)``, ``z = clamp(round(-r lo / s), 0, 2^b - 1)``.

Small ``p`` tolerates clipped outliers (tight range, fine steps); large ``p`` protects them. Raw ``L_p`` values
are not comparable across ``p``; DetPTQ picks ``p`` per layer with a task loss (ODOL, :mod:`detptq_mini.odol`).

The search is vectorized over channels and shares the quantization of each candidate across every ``p``:
the error ``e = |X - Q(X)|`` is computed once per candidate, and for ``p`` in ``{1, 1.5, ..., 5}`` the sums
``sum e^p`` are entries of the Gram matrix of ``(e^0.5, e, e^2, e^2.5)`` (``sum e^(a+b) = <e^a, e^b>``), so
the eight ``p`` of ``P`` cost one square root, two products and one small batched matrix product. Any other
``p`` falls back to ``e.pow(p)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from .checks import check_axis, check_bits, check_bool, check_finite, check_int, check_number, check_ps
from .quant import collect_activations, fake_quantize, fake_quantize_forward, int_range, qparams_from_range, quant_layers

__all__ = ["P_DEFAULT", "LpSweep", "minmax_scale", "lp_error", "lp_sweep", "lp_scale_search", "LayerScales",
           "search_model_scales", "apply_scales"]

P_DEFAULT: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)

_BASIS = (0.5, 1.0, 2.0, 2.5)  # exponents whose pairwise sums cover p = 1, 1.5, ..., 5
_PAIRS = {a + b: (i, j) for i, a in enumerate(_BASIS) for j, b in enumerate(_BASIS) if i <= j}
_CHUNK = 2**17  # elements (candidates x channels x columns) per step of the search: the buffers stay in L2
_KMAX = 2**12  # columns per step: float32 Gram sums over at most 4096 terms, accumulated in float64


def _check_x(x: Tensor) -> None:
    check_finite(x)
    if x.numel() == 0:
        raise ValueError("x is empty: there is nothing to quantize")


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as ``(C, K)``: one row per channel along ``axis`` (one row in all per tensor)."""
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def minmax_scale(x: Tensor, bits: int, axis: int | None = None, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Min-max ``(scale, zero_point)`` of ``x``: the ``r = 1`` candidate of :func:`lp_scale_search`.

    Args:
        x: tensor ``X``, finite, non-empty.
        bits: bit width ``b``, 2..8.
        axis: ``None`` per tensor, else the channel dimension.
        symmetric: integer range (:func:`detptq_mini.quant.int_range`).

    Returns:
        float32 scale and int32 zero point, shape ``()`` per tensor or ``(x.shape[axis],)``.
    """
    _check_x(x)
    bits = check_bits("bits", bits)
    check_bool("symmetric", symmetric)
    axis = check_axis(axis, x.dim())
    rows = _rows(x.detach(), axis)
    scale, zero_point = qparams_from_range(rows.amin(1).cpu(), rows.amax(1).cpu(), bits, symmetric)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return scale.to(x.device), zero_point.to(x.device)


def lp_error(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int,
             p: float, axis: int | None = None,
             symmetric: bool = False) -> Tensor:
    """The metric ``L_p = mean(|X - Q(X; s, z)|^p)``, per channel when
    ``axis`` is given.

    Args:
        x: tensor ``X``.
        scale, zero_point: ``s`` and ``z`` as
            :func:`detptq_mini.quant.fake_quantize` takes them.
        bits, symmetric: the integer range.
        p: exponent, finite and > 0.
        axis: ``None`` per tensor, else the channel dimension.

    Returns:
        float64 tensor, shape ``()`` per tensor or ``(x.shape[axis],)``.
    """
    _check_x(x)
    check_number("p", p, 0, low_open=True)
    qmin, qmax = int_range(bits, symmetric)
    axis = check_axis(axis, x.dim())
    x = x.detach()
    x_hat = fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    err = (x - x_hat).abs().double().pow(p)
    return err.mean() if axis is None else _rows(err, axis).mean(1)


@dataclass(frozen=True)
class LpSweep:
    """``L_p`` of every candidate scale for every ``p`` (what :func:`lp_scale_search` minimises).

    ``cs`` below is ``()`` per tensor and ``(C,)`` per channel.

    Attributes:
        ps: the exponents ``p``, in the order given.
        ratios: ``r = i / grid``, shape ``(G,)``, float64.
        scale: candidate scales, shape ``(G, *cs)``, float32.
        zero_point: candidate zero points, shape ``(G, *cs)``, int32.
        error: ``L_p`` per ``p`` and candidate, shape ``(P, G, *cs)``, float64.
    """

    ps: tuple[float, ...]
    ratios: Tensor
    scale: Tensor
    zero_point: Tensor
    error: Tensor

    def best(self) -> dict[float, tuple[Tensor, Tensor]]:
        """``{p: (s_p*, z_p*)}``: per ``p`` (and channel) the candidate with the lowest ``L_p``.

        Ties go to the larger ratio ``r`` (the wider range).
        """
        g = self.ratios.numel()
        idx = g - 1 - self.error.flip(1).argmin(1)  # (P, *cs): the last minimum, i.e. the largest ratio
        out = {}
        for k, p in enumerate(self.ps):
            i = idx[k].unsqueeze(0)
            out[p] = (self.scale.gather(0, i).squeeze(0), self.zero_point.gather(0, i).squeeze(0))
        return out


def _gram(e: Tensor, basis: Tensor) -> Tensor:
    """``sum_k e^(a + b)`` for ``a, b`` in ``_BASIS``, per row of ``e`` ``(R, K)``: shape ``(R, 16)``.

    ``basis`` is a ``(R, 4, K)`` buffer whose slot 1 already holds ``e``.
    """
    torch.sqrt(e, out=basis[:, 0])
    torch.mul(e, e, out=basis[:, 2])
    torch.mul(basis[:, 2], basis[:, 0], out=basis[:, 3])
    return torch.bmm(basis, basis.transpose(1, 2)).view(-1, 16)


def lp_sweep(x: Tensor, bits: int, ps: Iterable[float] = P_DEFAULT, axis: int | None = None, symmetric: bool = False,
             grid: int = 100) -> LpSweep:
    """``L_p(s)`` of ``x`` for every candidate ``s`` (ratios ``r = i / grid``) and every ``p`` in ``ps``.

    Args are those of :func:`lp_scale_search`. Cost: ``grid`` fake quantizations of ``x``, shared by all ``p``,
    in chunks of about ``_CHUNK = 2^17`` elements, with no Python loop over channels.
    """
    _check_x(x)
    bits = check_bits("bits", bits)
    check_bool("symmetric", symmetric)
    ps = check_ps(ps)
    grid = check_int("grid", grid, 1)
    axis = check_axis(axis, x.dim())
    qmin, qmax = int_range(bits, symmetric)
    rows = _rows(x.detach(), axis).contiguous()  # (C, K)
    c, k_cols = rows.shape
    ratios = torch.arange(1, grid + 1, dtype=torch.float64) / grid
    lo, hi = rows.amin(1).cpu().double(), rows.amax(1).cpu().double()
    scale, zero_point = qparams_from_range(ratios[:, None] * lo, ratios[:, None] * hi, bits, symmetric)  # (G, C)
    s = scale.to(rows.device, rows.dtype).unsqueeze(-1)  # (G, C, 1)
    z = zero_point.to(rows.device, rows.dtype).unsqueeze(-1)
    # Huge or tiny rows would overflow/underflow e^(a+b) in the float32 sums (e^4.5 overflows for e > ~4e8).
    # Such a row and its candidate scales are multiplied by 2^-k, k even: exact in floating point, so every
    # code is the same and e scales by exactly 2^-k, sqrt(e) by 2^(-k/2); L_p then scales by 2^(-k p), which
    # is multiplied back in float64. Rows within [2^-16, 2^16] keep k = 0 (nothing changes for them).
    amax = rows.abs().amax(1).double()
    shift = (amax > 2.0**16) | ((amax < 2.0**-16) & (amax > 0))
    k = None
    if bool(shift.any()):
        k = torch.where(shift, 2 * torch.floor(torch.log2(amax.clamp(min=1e-300)) / 2), 0.0).clamp(-126, 126)
        factor = torch.exp2(-k).to(rows.dtype)  # (C,), powers of two, normal floats
        rows = rows * factor[:, None]
        s = s * factor.view(1, -1, 1)

    k_step = max(1, min(k_cols, _KMAX, _CHUNK // c))
    g_step = max(1, min(grid, _CHUNK // (c * k_step)))
    fast = [p for p in ps if p in _PAIRS]  # from the Gram matrix
    slow = [p for p in ps if p not in _PAIRS]  # from e.pow(p)
    buf = torch.empty(g_step * c, 4 if fast else 1, k_step, dtype=rows.dtype, device=rows.device)
    gram = torch.zeros(grid, c, 16, dtype=torch.float64, device=rows.device)
    pows = torch.zeros(grid, c, len(slow), dtype=torch.float64, device=rows.device)
    for g0 in range(0, grid, g_step):
        g1 = min(g0 + g_step, grid)
        for k0 in range(0, k_cols, k_step):
            xk = rows[:, k0:k0 + k_step]  # (C, kk)
            basis = buf[: (g1 - g0) * c, :, : xk.shape[1]]
            e = basis[:, 1 if fast else 0].view(g1 - g0, c, xk.shape[1])
            fake_quantize_forward(xk, s[g0:g1], z[g0:g1], qmin, qmax, out=e)  # the shared kernel
            e = e.sub_(xk).abs_().view(-1, xk.shape[1])  # e = |X - Q(X)|, one row per (candidate, channel)
            if fast:
                gram[g0:g1] += _gram(e, basis).view(g1 - g0, c, 16)
            for j, p in enumerate(slow):
                pows[g0:g1, :, j] += e.pow(p).sum(1, dtype=torch.float64).view(g1 - g0, c)
    sums = torch.stack([gram[..., 4 * _PAIRS[p][0] + _PAIRS[p][1]] if p in _PAIRS else pows[..., slow.index(p)]
                        for p in ps], dim=-1)  # (G, C, P)
    error = (sums / k_cols).permute(2, 0, 1)  # (P, G, C)
    if k is not None:  # undo the row shifts: L_p(x) = 2^(k p) L_p(x 2^-k)
        pk = torch.tensor(ps, dtype=torch.float64, device=error.device).view(-1, 1, 1) * k.to(error.device)
        error = error * torch.exp2(pk)
    if axis is None:
        scale, zero_point, error = scale[:, 0], zero_point[:, 0], error[:, :, 0]
    dev = x.device
    return LpSweep(ps, ratios, scale.to(dev), zero_point.to(dev), error.to(dev))


def lp_scale_search(x: Tensor, bits: int, ps: Iterable[float] = P_DEFAULT, axis: int | None = None,
                    symmetric: bool = False, grid: int = 100) -> dict[float, tuple[Tensor, Tensor]]:
    """For every ``p`` in ``ps``, the candidate ``(s, z)`` with the lowest ``L_p`` (method page, section 3).

    Args:
        x: tensor ``X``: weights ``(C_out, C_in, kH, kW)`` with ``axis=0, symmetric=True``, or an activation
            sample (any shape) with ``axis=None, symmetric=False``. Finite and non-empty.
        bits: bit width ``b``, 2..8.
        ps: exponents ``p``, each finite and > 0 (default ``P_DEFAULT``).
        axis: ``None`` per tensor, else the channel dimension (each channel gets its own ``s_p*``).
        symmetric: symmetric (clip ``r max|X_c|``, ``z = 0``) or asymmetric (range ``(r lo, r hi)``).
        grid: number of candidate ratios ``r = i / grid``, ``i = 1..grid`` (``r = 1`` is min-max), >= 1.

    Returns:
        ``{p: (scale, zero_point)}``: float32 and int32, shape ``()`` per tensor or ``(x.shape[axis],)``. Ties
        between candidates go to the larger ratio.
    """
    return lp_sweep(x, bits, ps, axis, symmetric, grid).best()


# ------------------------------------------------------------ model level
@dataclass
class LayerScales:
    """``s_p*`` of one quantized conv for every ``p``: ``weight[p]`` and ``act[p]`` are ``(scale, zero_point)``."""

    weight: dict[float, tuple[Tensor, Tensor]]
    act: dict[float, tuple[Tensor, Tensor]]


def search_model_scales(qmodel, images, ps: Iterable[float] = P_DEFAULT, layers: Iterable[str] | None = None,
                        grid: int = 100, max_elements: int = 2**20, seed: int = 0, batch_size: int = 32,
                        progress: bool = False) -> dict[str, LayerScales]:
    """``s_p*`` for every ``p`` of every quantized conv of ``qmodel`` (weights and input activations).

    Weights are searched per output channel with each layer's weight quantizer's settings; activations per
    tensor on a sample (at most ``max_elements`` values, seed ``seed``) of the layer's FP inputs on
    ``images``: every quantizer is off while they are collected. One search serves every ``p`` (see the
    module docstring), so this is the whole cost of trying all of ``P``.

    Returns:
        ``{layer name: LayerScales}`` in forward order.
    """

    ps = check_ps(ps)
    all_layers = quant_layers(qmodel)
    names = list(all_layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(f"layers has {unknown[:3]} that are not quantized convs; allowed: {', '.join(all_layers)}")
    acts = collect_activations(qmodel, images, names, max_elements=max_elements, seed=seed, batch_size=batch_size)
    it = names
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(names, desc="Lp scale search", unit="layer")
    out = {}
    for name in it:
        layer = all_layers[name]
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        w = layer.conv.weight.detach()
        out[name] = LayerScales(
            weight=lp_scale_search(w, wq.bits, ps, axis=wq.axis, symmetric=wq.symmetric, grid=grid),
            act=lp_scale_search(acts.pop(name), aq.bits, ps, axis=None, symmetric=aq.symmetric, grid=grid),
        )
    return out


def apply_scales(qmodel, scales: dict[str, LayerScales], p: float | dict[str, float],
                 act_p: float | dict[str, float] | None = None) -> None:
    """Set each layer's quantizers to its ``s_p*``: one ``p`` for all, or ``{layer: p}``.

    ``act_p`` (same forms) selects the activations' ``p`` separately; by default it is ``p``.
    """

    layers = quant_layers(qmodel)

    def pick(choice, name):
        return choice[name] if isinstance(choice, dict) else choice

    for name, sc in scales.items():
        wp = pick(p, name)
        ap = wp if act_p is None else pick(act_p, name)
        if wp not in sc.weight or ap not in sc.act:
            raise ValueError(f"p={wp!r}/{ap!r} for layer {name!r} was not searched; searched: {sorted(sc.weight)}")
        layers[name].weight_quantizer.set_qparams(*sc.weight[wp])
        layers[name].input_quantizer.set_qparams(*sc.act[ap])
