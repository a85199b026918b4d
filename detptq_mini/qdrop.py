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
  summed over kept elements only). A disabled inner quantizer passes its input through. Before every
  forward the step size is made positive the reference's way (``abs``, then at least ``eps``), so a step
  that an optimiser pushes below zero comes back instead of sticking at a clamp.
* The keep masks are fresh random numbers per element and step, as in the reference (:func:`draw_keep`: 16
  random bits per element, so ``quant_prob`` is honoured to 1/65536; four elements per 64-bit draw, which
  makes a mask about 2.5x cheaper than ``torch.rand``).
* The unit's *input* gets one coin per element (:class:`InputCoin`, the reference's
  ``where(rand < p, quant_inp, fp_inp)``): kept, the element is the quantized-prefix input, quantized by
  the consuming conv's input quantizer (our quantizers sit at conv inputs, so the prefix's output is not
  quantized yet); dropped, it is the FP input, left in float. The coin is carried to every quantizer that
  reads input elements unchanged, also through shape-only operations (split, concatenation, nearest
  upsampling): :class:`InputCoin` finds which elements of which conv input are copies of which unit-input
  elements by running the unit once on coded inputs, and hands those quantizers the same coin instead of a
  coin of their own. One input element read by several convs is kept or dropped for all of them alike,
  each kept copy quantized by its own conv's quantizer. Elements computed inside the unit get their
  quantizer's own coin.
* ``qdrop_input="two-coin"`` keeps the earlier scheme as a named ablation [ours]: :class:`InputMix` mixes
  the quantized-prefix and the FP input element-wise, and then the first quantizer tosses a coin of its
  own, so an element is ``Q(x_q)``, ``x_q``, ``Q(x_fp)`` or ``x_fp`` (the middle two exist in neither
  model); its masks come from a :class:`MaskPool` of 128 reused per-sample masks.
* All the masks of a unit and its batch sampling share one generator, seeded from ``(seed, unit name)``,
  so a run is reproducible; with ``quant_prob = 1`` no mask is drawn at all.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from .quant import QuantConv2d, Quantizer

__all__ = ["EPS", "mixed_fake_quantize", "draw_keep", "MaskPool", "InputMix", "InputCoin", "QDropQuantizer",
           "attach", "finish"]

#: The smallest step size (float32 machine epsilon, as the reference's LSQ quantizer).
EPS = float(torch.finfo(torch.float32).eps)
MaskMode = Literal["fresh", "pool"]


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
        the mixed tensor. Its backward is the clipped STE on kept elements, the identity on dropped ones; for
        ``scale`` the LSQ gradient (``round(x/s) - x/s`` inside the range, ``q - z`` outside) summed over kept elements
        and multiplied by ``grad_factor``.
    """
    return _MixedFakeQuantize.apply(x, scale, zero_point, qmin, qmax, keep, grad_factor)


def _rows(x: Tensor) -> Tensor:
    """``x`` as ``(batch, elements)`` in its memory order (channels-last for a 4-d channels-last tensor): a view
    when ``x`` is contiguous in that order."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1)


def _unrows(rows: Tensor, like_shape: Sequence[int], channels_last: bool) -> Tensor:
    """The inverse of :func:`_rows` for a tensor of shape ``like_shape`` (batch from ``rows``)."""
    if channels_last:
        _, c, h, w = like_shape
        return rows.view(rows.shape[0], h, w, c).permute(0, 3, 1, 2)
    return rows.view((rows.shape[0],) + tuple(like_shape[1:]))


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def draw_keep(rows: int, cols: int, prob: float, generator: torch.Generator | None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Tensor:
    """A fresh ``(rows, cols)`` keep mask: 1 with probability ``prob`` (to 1/65536), else 0, in ``dtype``.

    Each element gets 16 fresh random bits (four per 64-bit draw of ``generator``), compared with
    ``prob * 65536``: about 2.5x cheaper on a CPU than ``torch.rand(...) < prob``, with the same meaning.
    """
    if prob >= 1 or prob <= 0:  # (the int16 comparison below cannot express 1; nothing random to draw)
        return torch.full((rows, cols), float(prob >= 1), dtype=dtype, device=device)
    n = rows * cols
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), generator=generator, dtype=torch.int64, device=device)
    threshold = round(prob * 65536) - 32768  # int16 values are uniform on [-32768, 32767]
    return bits.view(torch.int16)[:n].view(rows, cols).lt(threshold).to(dtype)


def _fresh_like(x: Tensor, prob: float, generator: torch.Generator | None) -> Tensor:
    """A fresh keep mask of ``x``'s shape, dtype and memory order."""
    rows = draw_keep(x.shape[0], x[0].numel(), prob, generator, x.dtype, x.device)
    return _unrows(rows, x.shape, _is_channels_last(x))


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


class InputCoin:
    """QDrop's coin at a unit's input, as the reference tosses it: one coin per input element.

    Built once per unit (before its quantizers are swapped): the unit is run on two coded versions of one
    sample of its inputs (each element holding its own index, in two different orders), and a forward
    pre-hook on each of its :class:`~detptq_mini.quant.QuantConv2d` layers records which elements of the
    layer's input are exact copies of which unit-input elements (both codes agree). Those are the elements
    that reach the layer through shape-only operations (the unit's input itself, a split, a concatenation,
    a nearest upsampling). Calling the coin on a batch:

    * draws a fresh keep mask per input element (probability ``prob``, :func:`draw_keep`);
    * returns the mixed inputs: the quantized-prefix input where kept, the FP input where dropped;
    * hands each layer that reads input elements a keep mask for its own input (:attr:`QDropQuantizer.coin`):
      the input's coin on the copied elements, a fresh coin of the layer's own on the others.

    So a kept element reaches the conv as ``Q(x_q)`` and a dropped one as ``x_fp``, never ``x_q`` unquantized
    nor ``Q(x_fp)``. ``prob >= 1`` returns the quantized-prefix inputs and draws nothing.

    Args:
        module: the unit, called as ``module(*inputs)``, with plain (deterministic) quantizers.
        layers: the unit's quantized layers by name.
        example: one tensor per unit input (only shapes, dtype and memory order are used).
        prob: the probability that an element is kept (quantized).
        generator: the random stream of the masks.
    """

    def __init__(self, module: nn.Module, layers: dict[str, QuantConv2d], example: Sequence[Tensor], prob: float,
                 generator: torch.Generator | None):
        self.prob, self.generator = prob, generator
        self.shapes = [tuple(t.shape) for t in example]
        self.channels_last = [_is_channels_last(t) for t in example]
        self.sizes = [t[0].numel() for t in example]
        #: per layer, per call of the layer in one forward of the unit, a tuple (positions in the layer's input
        #: rows that copy an input element, the source positions in the concatenated input rows, the layer input's
        #: sample shape, its memory order, all copied?), or None for a call that copies no input element
        self.maps: dict[str, list[tuple[Tensor, Tensor, tuple[int, ...], bool, bool] | None]] = {}
        self.quantizers: dict[str, QDropQuantizer] = {}
        if prob < 1:
            self._probe(module, layers, example)

    @torch.no_grad()
    def _probe(self, module: nn.Module, layers: dict[str, QuantConv2d], example: Sequence[Tensor]) -> None:
        total = sum(self.sizes)
        if total >= 2**24:  # codes must be exact in float32
            raise ValueError(f"the unit's inputs hold {total} elements per sample; InputCoin codes at most 2**24")
        g = torch.Generator().manual_seed(0)
        perms = (torch.randperm(total, generator=g), torch.randperm(total, generator=g))
        # three codings of every element's index: ascending, permuted and negative (a ReLU breaks it), permuted
        codings = ((torch.arange(total) + 1).float(), -(perms[0] + 1).float(), (perms[1] + 1).float())
        seen: dict[str, list[tuple[Tensor, tuple[int, ...], bool]]] = {name: [] for name in layers}

        def hook(name):
            def record(module, args):
                x = args[0]
                seen[name].append((_rows(x)[0].clone(), tuple(x.shape[1:]), _is_channels_last(x)))
            return record

        hooks = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
        try:
            for values in codings:
                values = values.to(example[0].dtype)
                inputs, start = [], 0
                for t, size, cl in zip(example, self.sizes, self.channels_last):
                    rows = values[start:start + size].view(1, size).to(t.device)
                    inputs.append(_unrows(rows, (1,) + tuple(t.shape[1:]), cl).contiguous(
                        memory_format=torch.channels_last if cl else torch.contiguous_format))
                    start += size
                module(*inputs)
        finally:
            for h in hooks:
                h.remove()
        for name, got in seen.items():
            calls = len(got) // len(codings)
            if not calls or len(got) % len(codings):
                continue  # a layer the unit did not run: nothing to hand over
            per_call = []
            for k in range(calls):  # a layer run several times per forward (a shared head) has a map per call
                (a, shape, cl), (b, _, _), (c, _, _) = got[k], got[k + calls], got[k + 2 * calls]
                code = a.round()
                src = (code - 1).long()
                valid = (code == a) & (src >= 0) & (src < total)
                src_safe = src.clamp(0, total - 1)
                direct = valid & (codings[1][src_safe].to(b.dtype) == b) & (codings[2][src_safe].to(c.dtype) == c)
                if bool(direct.any()):
                    where = direct.nonzero().flatten()
                    per_call.append((where, src[where], shape, cl, bool(direct.all())))
                else:
                    per_call.append(None)  # this call reads computed elements only: its own coin
            if any(m is not None for m in per_call):
                self.maps[name] = per_call

    def bind(self, quantizers: dict[str, "QDropQuantizer"]) -> None:
        """The :class:`QDropQuantizer` of each layer (after :func:`attach`) that the coin hands its masks to."""
        self.quantizers = {name: quantizers[name] for name in self.maps if name in quantizers}

    def __call__(self, x_q: Sequence[Tensor], x_fp: Sequence[Tensor], idx: Tensor) -> list[Tensor]:
        """The batch ``idx`` of the mixed inputs; sets the coin of every bound quantizer for the next forward."""
        if self.prob >= 1:
            return [t[idx] for t in x_q]
        qs, fps = [t[idx] for t in x_q], [t[idx] for t in x_fp]
        keep = draw_keep(len(idx), sum(self.sizes), self.prob, self.generator, qs[0].dtype, qs[0].device)
        mixed, start = [], 0
        for q, fp, size in zip(qs, fps, self.sizes):
            k = _unrows(keep[:, start:start + size], q.shape, _is_channels_last(q))
            mixed.append(torch.addcmul(q.mul_(k), fp, 1.0 - k))  # exactly q or fp (a product with 0 or 1 is exact)
            start += size
        for name, quantizer in self.quantizers.items():
            coins = []
            for entry in self.maps[name]:
                if entry is None:
                    coins.append(None)
                    continue
                where, src, shape, cl, full = entry
                if full:
                    rows = keep[:, src]
                else:
                    rows = draw_keep(len(idx), math.prod(shape), self.prob, self.generator, keep.dtype, keep.device)
                    rows[:, where] = keep[:, src]
                coins.append(_unrows(rows, (len(idx),) + shape, cl))
            quantizer.coin = coins
        return mixed


class QDropQuantizer(nn.Module):
    """An activation quantizer for reconstruction: a learnable step size (LSQ) and QDrop's random keep.

    Wraps a calibrated :class:`~detptq_mini.quant.Quantizer` (per tensor), kept as ``inner``. ``forward(x)``
    fake-quantizes ``x`` with the learnable ``scale`` and, while ``drop`` is on and ``quant_prob < 1``, keeps
    each quantized element with probability ``quant_prob`` and the FP value otherwise
    (:func:`mixed_fake_quantize`). The step size's gradient is scaled by LSQ's ``1 / sqrt(features * qmax)``
    (``features``: the elements of one sample). A disabled inner quantizer passes ``x`` through.

    The keep mask of a call is, in this order: the next entry of :attr:`coin` when an :class:`InputCoin` has
    set it (each entry used once), else a fresh mask (``masks="fresh"``, :func:`draw_keep`) or one from a :class:`MaskPool` of ``pool``
    per-sample masks (``masks="pool"``, the two-coin ablation [ours]). A learnable step size is made positive
    before every forward (``abs``, then at least :data:`EPS`), as the reference's LSQ quantizer does.
    """

    def __init__(self, quantizer: Quantizer, quant_prob: float, generator: torch.Generator | None,
                 learn_scale: bool = True, pool: int = 128, masks: MaskMode = "fresh"):
        super().__init__()
        if not isinstance(quantizer, Quantizer) or quantizer.axis is not None:
            raise ValueError("quantizer must be a per-tensor Quantizer")
        if masks not in ("fresh", "pool"):
            raise ValueError(f"masks={masks!r} is not a mask mode; allowed: fresh, pool")
        self.inner = quantizer
        scale = quantizer.scale.detach().clone()
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.zero = float(quantizer.zero_point)
        self.quant_prob = quant_prob
        self.generator = generator
        self.mode = masks
        self.masks = MaskPool(quant_prob, generator, pool)
        self.drop = True
        #: the keep masks of the next calls, in order, set by an :class:`InputCoin` (a None entry, or none left:
        #: this quantizer's own coin)
        self.coin: list[Tensor | None] | None = None

    def _keep(self, x: Tensor) -> Tensor | None:
        coin = self.coin.pop(0) if self.coin else None  # this call's mask from the input coin, in call order
        if coin is not None:
            if coin.shape != x.shape:
                raise RuntimeError(f"the input coin's mask has shape {tuple(coin.shape)}, the input {tuple(x.shape)}")
            return coin
        if not self.drop or self.quant_prob >= 1:
            return None
        return self.masks(x) if self.mode == "pool" else _fresh_like(x, self.quant_prob, self.generator)

    def forward(self, x: Tensor) -> Tensor:
        if not self.inner.enabled:
            self.coin = None
            return x
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.abs_().clamp_(min=EPS)
        keep = self._keep(x)
        g = 1.0 / math.sqrt(x[0].numel() * self.inner.qmax)
        return mixed_fake_quantize(x, self.scale, self.zero, self.inner.qmin, self.inner.qmax, keep, g)

    @torch.no_grad()
    def finish(self) -> None:
        """Write the learned step size into the inner quantizer (zero point unchanged); drop the mask pool."""
        self.inner.set_qparams(self.scale.detach().abs().clamp_min(EPS), self.inner.zero_point)
        self.masks.pool = None
        self.coin = None


def attach(layer: QuantConv2d, quant_prob: float, generator: torch.Generator | None,
           learn_scale: bool = True, masks: MaskMode = "fresh") -> QDropQuantizer:
    """Swap a :class:`QDropQuantizer` in for ``layer``'s input quantizer (kept as its ``inner``).

    Args:
        layer: a :class:`~detptq_mini.quant.QuantConv2d` with a calibrated per-tensor input quantizer.
        quant_prob: probability that an element is quantized.
        generator: the random stream of the masks.
        learn_scale: make the step size an ``nn.Parameter`` (else a fixed buffer).
        masks: ``"fresh"`` random numbers per element and step (the reference), or ``"pool"`` (see
            :class:`MaskPool`).

    Returns:
        the attached :class:`QDropQuantizer`.
    """
    if not isinstance(layer, QuantConv2d):
        raise ValueError(f"layer must be a QuantConv2d, got {type(layer).__name__}")
    if isinstance(layer.input_quantizer, QDropQuantizer):
        raise ValueError("layer already has a QDropQuantizer attached; call finish(layer) first")
    drop = QDropQuantizer(layer.input_quantizer, quant_prob, generator, learn_scale=learn_scale, masks=masks)
    layer.input_quantizer = drop
    return drop


def finish(layer: QuantConv2d) -> None:
    """Write the learned step size into ``layer``'s original input quantizer and put that quantizer back."""
    drop = layer.input_quantizer
    if not isinstance(drop, QDropQuantizer):
        raise ValueError("layer has no QDropQuantizer attached (see attach)")
    drop.finish()
    layer.input_quantizer = drop.inner
