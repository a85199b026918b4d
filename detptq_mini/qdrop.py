"""QDrop: quantize each activation element only with probability ``quant_prob`` during reconstruction (Wei et
al. 2022; method page, section 6).

BRECQ reconstructs a unit with every activation quantized. QDrop quantizes each activation element with
probability ``quant_prob`` and leaves it in float otherwise, a new random choice per step, so that the
learned rounding and step sizes are fitted to a family of partly quantized networks (the paper's argument:
a flatter optimum than for the one fully quantized network). ``quant_prob = 1`` is BRECQ. (QDrop's code
calls this probability ``drop_prob`` although it is the probability of *keeping* quantization; we name it
for what it is.)

How this code does it:

* :class:`QDropQuantizer` stands in for a layer's input quantizer during reconstruction (:func:`attach`,
  :func:`finish`): it fake-quantizes with a learnable step size (LSQ, gradient scaled by
  ``1 / sqrt(features * qmax)``, zero point fixed) and multiplies by a 0/1 keep mask:
  ``x_hat * keep + x * (1 - keep)`` (:func:`mixed_fake_quantize`, one fused autograd function in float
  arithmetic: the clipped STE on kept elements, the identity on the others, and the step size's gradient
  summed over kept elements only). A disabled inner quantizer passes its input through.
* The masks are *not* drawn fresh per element and step [ours]: a :class:`MaskPool` draws ``size`` (128)
  per-sample masks once, on its first call (again only if the shape or dtype changes), and each call gives
  each sample of the batch a mask picked at random from that pool. Within one unit's reconstruction each
  quantizer thus uses at most 128 distinct masks, each element kept with probability ``quant_prob``.
  (Drawing a random number per element costs about as much as the convolution itself on a CPU.)
* The unit's *input* is mixed too (:class:`InputMix`, used by
  :func:`detptq_mini.reconstruction.reconstruct_unit`): each element is the quantized-prefix input (the
  output of the already reconstructed, quantized units before it, not passed through this unit's
  quantizers yet) with probability ``quant_prob`` and the FP model's input otherwise, with masks from a pool
  of its own. The mixed input then meets the unit's first :class:`QDropQuantizer` like any activation, with
  an independent mask: where it reaches a quantized conv unchanged (the first conv, or after the neck's
  nearest upsampling and concat), an element is the quantized-prefix value quantized with probability
  ``quant_prob ** 2``, the FP value quantized or the quantized-prefix value in float with ``quant_prob *
  (1 - quant_prob)`` each, and the FP value in float with ``(1 - quant_prob) ** 2``. For the first unit both
  inputs are the images, so its mix changes nothing (but still draws its masks).
* All the masks of a unit (its input mixes and every :class:`QDropQuantizer`) and its batch sampling share
  one generator, seeded from ``(seed, unit name)``, so a run is reproducible; with ``quant_prob = 1`` no
  mask is drawn at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .quant import QuantConv2d, Quantizer

__all__ = ["mixed_fake_quantize", "MaskPool", "InputMix", "QDropQuantizer", "attach", "finish"]


class _MixedFakeQuantize(torch.autograd.Function):
    """:func:`mixed_fake_quantize` (see there)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point: float, qmin: int, qmax: int, keep, grad_factor: float):
        inv = 1.0 / scale
        t = x * inv
        q = torch.round(t).add_(zero_point)
        x_hat = q.clamp(qmin, qmax)
        inr = (q - x_hat).abs_().clamp_(max=1.0).neg_().add_(1.0)  # 1 inside the range, 0 outside
        x_hat.sub_(zero_point)
        need_s = ctx.needs_input_grad[1]
        ds = torch.addcmul(x_hat, inr, t, value=-1.0) if need_s else None  # d(x_hat)/ds: q - z - x/s inside, q - z out
        x_hat.mul_(scale)
        if keep is None:
            out, gx = x_hat, inr
        else:  # x_hat * keep + x * (1 - keep): exactly x_hat or x (a product with 0 or 1 is exact)
            drop = 1.0 - keep
            out = torch.addcmul(x_hat.mul_(keep), x, drop)
            gx = torch.addcmul(drop, keep, inr)
            if need_s:
                ds.mul_(keep)
        ctx.grad_factor = grad_factor
        ctx.save_for_backward(gx, ds) if need_s else ctx.save_for_backward(gx)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx, *rest = ctx.saved_tensors
        grad_x = grad * gx if ctx.needs_input_grad[0] else None
        grad_s = (grad * rest[0]).sum().mul_(ctx.grad_factor).reshape(()) if rest else None
        return grad_x, grad_s, None, None, None, None, None


def mixed_fake_quantize(x: Tensor, scale: Tensor, zero_point: float, qmin: int, qmax: int, keep: Tensor | None = None,
                        grad_factor: float = 1.0) -> Tensor:
    """Fake quantization with an element-wise keep mask: ``x_hat * keep + x * (1 - keep)``.

    In float arithmetic (no ``where``, no bool masks, which are several times slower than float ops on CPU).
    The forward is :func:`detptq_mini.quant.fake_quantize_forward`'s sequence of operations, so kept elements
    equal :func:`~detptq_mini.quant.fake_quantize` bit for bit and dropped ones equal ``x``. No checks: the
    caller (:class:`QDropQuantizer`) passes valid arguments.

    Args:
        x: the activations, any shape.
        scale: the step size ``s > 0``, a one-element tensor (may require grad).
        zero_point: ``z``, an integer-valued number in ``[qmin, qmax]``.
        qmin, qmax: the integer range.
        keep: 0/1 mask of ``x``'s shape and dtype (1: quantize); ``None`` quantizes every element.
        grad_factor: multiplies the step size's gradient (LSQ's ``1 / sqrt(features * qmax)``).

    Returns:
        the mixed tensor. Backward: the clipped STE on kept elements, the identity on dropped ones; for ``scale``
        the LSQ gradient (``round(x/s) - x/s`` inside the range, ``q - z`` outside) summed over kept elements
        and multiplied by ``grad_factor``.
    """
    return _MixedFakeQuantize.apply(x, scale, zero_point, qmin, qmax, keep, grad_factor)


class MaskPool:
    """Random keep masks (1 with probability ``prob``, else 0) for batches of one tensor shape.

    Drawing a fresh random number per element costs about as much as the convolution itself on a CPU (the
    generator runs at a few ns per element), so a pool of ``size`` per-sample masks is drawn once (on the
    first call, or when the shape or dtype changes) and each call gives each sample of the batch a mask picked
    at random from the pool [ours]. Calling it draws from ``generator``; so does building the pool.
    """

    def __init__(self, prob: float, generator: torch.Generator | None, size: int = 128):
        self.prob, self.generator, self.size = prob, generator, size
        self.pool: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """A keep mask of ``x``'s shape and dtype (channels-last for a 4-d ``x``), a new tensor each call."""
        if self.pool is None or self.pool.shape[1:] != x.shape[1:] or self.pool.dtype != x.dtype:
            pool = torch.empty((self.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            pool.bernoulli_(self.prob, generator=self.generator)
            self.pool = pool.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else pool
        idx = torch.randint(0, self.size, (x.shape[0],), generator=self.generator, device=x.device)
        return self.pool[idx]


class InputMix:
    """QDrop's mix of a unit's input: the quantized-prefix input where kept (probability ``prob``), the FP
    input elsewhere, element-wise, with the masks of a :class:`MaskPool` of ``size`` per-sample masks.

    ``prob >= 1`` (BRECQ) returns the quantized-prefix input and draws nothing from ``generator``.
    """

    def __init__(self, prob: float, generator: torch.Generator | None, size: int = 128):
        self.prob = prob
        self.masks = MaskPool(prob, generator, size)

    def __call__(self, x_q: Tensor, x_fp: Tensor, idx: Tensor) -> Tensor:
        """The batch ``idx`` (sample indices) of the mixed input (a new tensor; ``x_q`` and ``x_fp`` unchanged).

        Args:
            x_q: the unit's input from the quantized prefix, ``(N, ...)``.
            x_fp: the same input from the FP model, same shape.
            idx: the batch's sample indices, a 1-d integer tensor.
        """
        if self.prob >= 1:
            return x_q[idx]
        fp = x_fp[idx]
        keep = self.masks(fp)
        return torch.addcmul(x_q[idx].mul_(keep), fp, keep.neg_().add_(1.0))


class QDropQuantizer(nn.Module):
    """An activation quantizer for reconstruction: a learnable step size (LSQ) and QDrop's random keep.

    Wraps a calibrated :class:`~detptq_mini.quant.Quantizer` (per tensor), kept as ``inner``. ``forward(x)``
    fake-quantizes ``x`` with the learnable ``scale`` and, while ``drop`` is on and ``quant_prob < 1``, keeps
    each quantized element with probability ``quant_prob`` and the FP value otherwise
    (:func:`mixed_fake_quantize`). The step size's gradient is scaled by LSQ's ``1 / sqrt(features * qmax)``
    (``features``: the elements of one sample). A disabled inner quantizer passes ``x`` through.
    The masks come from a :class:`MaskPool` of ``pool`` per-sample masks [ours].
    """

    def __init__(self, quantizer: Quantizer, quant_prob: float, generator: torch.Generator | None,
                 learn_scale: bool = True, pool: int = 128):
        super().__init__()
        if not isinstance(quantizer, Quantizer) or quantizer.axis is not None:
            raise ValueError("quantizer must be a per-tensor Quantizer")
        self.inner = quantizer
        scale = quantizer.scale.detach().clone()
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.zero = float(quantizer.zero_point)
        self.quant_prob = quant_prob
        self.masks = MaskPool(quant_prob, generator, pool)
        self.drop = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.inner.enabled:
            return x
        s = self.scale.clamp_min(1e-8)
        keep = self.masks(x) if self.drop and self.quant_prob < 1 else None
        g = 1.0 / math.sqrt(x[0].numel() * self.inner.qmax)
        return mixed_fake_quantize(x, s, self.zero, self.inner.qmin, self.inner.qmax, keep, g)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the learned step size into the inner quantizer (zero point unchanged); drop the mask pool."""
        self.inner.set_qparams(self.scale.detach().clamp_min(1e-8), self.inner.zero_point)
        self.masks.pool = None


def attach(layer: QuantConv2d, quant_prob: float, generator: torch.Generator | None,
           learn_scale: bool = True) -> QDropQuantizer:
    """Swap a :class:`QDropQuantizer` in for ``layer``'s input quantizer (kept as its ``inner``).

    Args:
        layer: a :class:`~detptq_mini.quant.QuantConv2d` with a calibrated per-tensor input quantizer.
        quant_prob: probability that an element is quantized.
        generator: the random stream of the masks.
        learn_scale: make the step size an ``nn.Parameter`` (else a fixed buffer).

    Returns:
        the attached :class:`QDropQuantizer`.
    """
    if not isinstance(layer, QuantConv2d):
        raise ValueError(f"layer must be a QuantConv2d, got {type(layer).__name__}")
    if isinstance(layer.input_quantizer, QDropQuantizer):
        raise ValueError("layer already has a QDropQuantizer attached; call finish(layer) first")
    drop = QDropQuantizer(layer.input_quantizer, quant_prob, generator, learn_scale=learn_scale)
    layer.input_quantizer = drop
    return drop


def finish(layer: QuantConv2d) -> None:
    """Write the learned step size into ``layer``'s original input quantizer and put that quantizer back."""
    drop = layer.input_quantizer
    if not isinstance(drop, QDropQuantizer):
        raise ValueError("layer has no QDropQuantizer attached (see attach)")
    drop.finish()
    layer.input_quantizer = drop.inner
