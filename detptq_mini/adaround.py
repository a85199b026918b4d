"""AdaRound: learn whether each weight rounds up or down (Nagel et al. 2020; method page, section 6).

Round-to-nearest is not the best rounding for a layer's *output*: rounding a few weights the "wrong" way
can cancel the errors of others. AdaRound keeps the weight scale ``s`` fixed and learns, per weight, a
continuous variable ``V`` whose rectified sigmoid ``h(V)`` in [0, 1] is added to ``floor(W / s)``::

    h(V)     = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
               with zeta = 1.1, gamma = -0.1
    W_soft   = s * (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z)
               during optimisation
    W_hard   = s * (clamp(floor(W / s) + [V >= 0] + z, qmin, qmax) - z)
               at the end
    f_reg(V) = sum over weights of (1 - |2 h(V) - 1| ** beta)

``zeta``/``gamma`` stretch the sigmoid so that ``h`` reaches exactly 0 and 1. ``V`` starts where
``W_soft = W`` (the FP weight, inside the range). The regulariser pushes every ``h`` to 0 or 1; its
temperature ``beta`` stays at 20 (a flat penalty: almost free movement) during a warm-up (20 % of the
iterations, regulariser off) and then falls linearly to 2 (a steep one), so at the end soft and hard
weights agree. What the rounding is optimised *for* (a layer's or a block's output) is the job of
:mod:`detptq_mini.reconstruction`, which swaps an :class:`AdaRoundQuantizer` in for a layer's weight
quantizer, optimises ``V``, then writes the hard weights back with :func:`finish`.

Paper symbols -> code: ``V`` -> ``AdaRoundQuantizer.v``, ``h(V)`` -> :func:`rectified_sigmoid`,
``zeta, gamma`` -> :data:`ZETA`, :data:`GAMMA`, ``beta`` -> :func:`beta_at`, ``lambda * f_reg`` ->
``lam * round_regularizer(v, beta)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import check_int, check_number
from .quant import QuantConv2d, Quantizer

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "init_v", "round_regularizer", "beta_at", "AdaRoundQuantizer",
           "attach", "finish"]

#: The stretch of the sigmoid (the paper's ``zeta``, ``gamma``) that lets :func:`rectified_sigmoid` reach 0 and 1.
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``: exactly 0 or 1 for large ``|V|``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: Tensor) -> Tensor:
    """The ``V`` with ``h(V) = frac`` for ``frac`` in [0, 1) (the fractional part of ``W / s``)."""
    if not isinstance(frac, Tensor) or not frac.is_floating_point():
        raise ValueError("frac must be a floating-point tensor")
    if not ((frac >= 0) & (frac < 1)).all():
        raise ValueError("frac must lie in [0, 1): pass W / s - floor(W / s)")
    # sigmoid(V) = (frac - gamma) / (zeta - gamma)  <=>  V = -log((zeta - gamma) / (frac - gamma) - 1)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


def round_regularizer(v: Tensor, beta: float) -> Tensor:
    """``f_reg = sum(1 - |2 h(V) - 1| ** beta)``: 0 when every ``h`` is 0 or 1, largest at ``h = 1/2``."""
    check_number("beta", beta, 0, low_open=True)
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_at(step: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser temperature at ``step`` (0-based) of ``iters``: ``None`` (regulariser off) in the
    warm-up (the first ``warmup * iters`` steps), then linear from ``start`` down to ``end`` at the last step.
    """
    iters = check_int("iters", iters, 1)
    check_number("warmup", warmup, 0, 1, high_open=True)
    first = int(warmup * iters)
    if step < first:
        return None
    span = max(iters - 1 - first, 1)
    return end + (start - end) * max(0.0, 1 - (step - first) / span)


class AdaRoundQuantizer(nn.Module):
    """A weight quantizer with learned rounding, standing in for a layer's :class:`~detptq_mini.quant.Quantizer`.

    Built from the layer's weight quantizer (its scale ``s`` and zero point ``z`` are kept fixed) and the
    FP weight ``W``. ``forward(w)`` ignores ``w`` (``W`` is cached as ``floor(W / s)`` and ``V``) and returns
    the soft weight while ``soft`` is True, the hard one otherwise.

    Attributes:
        v: the rounding variable ``V`` (an ``nn.Parameter`` of ``W``'s shape).
        soft: soft (``h(V)``) or hard (``V >= 0``) rounding.
    """

    def __init__(self, quantizer: Quantizer, weight: Tensor):
        super().__init__()
        if not isinstance(quantizer, Quantizer) or not bool(quantizer.calibrated):
            raise ValueError("quantizer must be a calibrated Quantizer (set its scale first)")
        shape = (-1,) + (1,) * (weight.dim() - 1) if quantizer.axis == 0 else ()
        scale = quantizer.scale.detach().to(weight.dtype).reshape(shape)
        zero = quantizer.zero_point.to(weight.dtype).reshape(shape)
        w = weight.detach()
        ratio = w * (1.0 / scale)  # the reciprocal multiply of fake_quantize
        floor = torch.floor(ratio)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        self.register_buffer("w_floor", floor)
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        self.v = nn.Parameter(init_v((ratio - floor).clamp(0.0, 1.0 - 1e-6)))
        self.soft = True

    def rounding(self) -> Tensor:
        """``h(V)`` (soft) or ``[V >= 0]`` (hard), the amount added to ``floor(W / s)``."""
        return rectified_sigmoid(self.v) if self.soft else (self.v >= 0).to(self.w_floor.dtype)

    def forward(self, w: Tensor | None = None) -> Tensor:
        q = torch.clamp(self.w_floor + self.rounding() + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """``W_hard``: on the quantizer's grid, so quantizing it again changes nothing."""
        q = torch.clamp(self.w_floor + (self.v >= 0).to(self.w_floor.dtype) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def extra_repr(self) -> str:
        return f"shape={tuple(self.v.shape)}, qmin={self.qmin}, qmax={self.qmax}, soft={self.soft}"


def attach(layer: QuantConv2d) -> AdaRoundQuantizer:
    """Swap an :class:`AdaRoundQuantizer` in for ``layer``'s weight quantizer (kept as ``layer._rtn_quantizer``)."""
    if not isinstance(layer, QuantConv2d):
        raise ValueError(f"layer must be a QuantConv2d, got {type(layer).__name__}")
    if isinstance(layer.weight_quantizer, AdaRoundQuantizer):
        raise ValueError("layer already has an AdaRoundQuantizer attached; call finish(layer) first")
    ada = AdaRoundQuantizer(layer.weight_quantizer, layer.conv.weight)
    layer._rtn_quantizer = layer.weight_quantizer
    layer.weight_quantizer = ada
    return ada


@torch.no_grad()
def finish(layer: QuantConv2d) -> int:
    """Write ``W_hard`` into ``layer.conv.weight``, restore the original weight quantizer (the soft state
    is removed). Returns how many weights round differently from round-to-nearest.
    """
    ada = layer.weight_quantizer
    if not isinstance(ada, AdaRoundQuantizer):
        raise ValueError("layer has no AdaRoundQuantizer attached (see attach)")
    w = layer.conv.weight
    nearest = torch.clamp(torch.round(w * (1.0 / ada.scale)) + ada.zero_point, ada.qmin, ada.qmax)
    hard = ada.hard_weight()
    changed = int((torch.round(hard * (1.0 / ada.scale)) + ada.zero_point != nearest).sum())
    w.copy_(hard)
    layer.weight_quantizer = layer._rtn_quantizer
    del layer._rtn_quantizer
    return changed
