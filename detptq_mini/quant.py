"""Uniform affine fake quantization, BN folding and the quantized conv wrapper.

A functional core (:func:`fake_quantize`, :func:`qparams_from_range`, :func:`fold_bn`) under thin modules
(:class:`Quantizer`, :class:`QuantConv2d`) and two model-level calls (:func:`quantize_model`,
:func:`calibrate_minmax`). The method page (book/method.md), section 2, is the specification.

The quantizer (paper symbols -> code): bit width ``b`` (``bits``), scale ``s`` (``scale``), zero point ``z``
(``zero_point``), integer range ``[qmin, qmax]`` (:func:`int_range`)::

    q     = clamp(round(x * (1 / s)) + z, qmin, qmax)
    x_hat = (q - z) * s

    (round half to even, as torch's fake-quant ops)

Backward: the clipped straight-through estimator for ``x`` (Bengio et al. 2013: gradient 1 where
``qmin <= round(x / s) + z <= qmax``, else 0) and the LSQ gradient for ``s`` (Esser et al. 2020), so that a
later step can learn the scale.

=================  =====================  =================  ===========================================
granularity        ``scale`` shape        integer range      used for (defaults: method page, section 2)
=================  =====================  =================  ===========================================
per tensor         ``()``                 ``[0, 2^b - 1]``   activations: the input of every conv
per channel (0)    ``(C_out,)``           ``[-2^(b-1),       weights, symmetric, ``z = 0``
                                          2^(b-1) - 1]``
=================  =====================  =================  ===========================================

BN folding follows Jacob et al. 2018 (integer-arithmetic-only inference).

**Deploy quantizers** (``QuantConfig(deploy=True)``, W8A8 or W4A8; method page, section 7): the tensors an integer
graph needs quantized besides the conv inputs and weights, so that the model simulates the fused int8 graph
``detptq_mini.export`` writes: each conv's output (``QuantConv2d.output_quantizer``, before its activation) and
the sigmoid of each SiLU that follows a quantized conv (:class:`QuantSiLU`, ``x * Q(sigmoid(x))``), all 8-bit
asymmetric per tensor. They are created disabled and uncalibrated; :func:`calibrate_deploy` sets their scales on
the calibration images (after the method has set every other scale: min-max, or a given search such as
``run_ptq``'s ``s_p*`` with p chosen by ODOL) and switches them on. Without
``deploy`` nothing of this exists, so the study methods and their results are unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, get_args

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from .checks import check_axis, check_bits, check_bool, check_choice, check_finite, check_images, check_int
from .model import UnitDetector

__all__ = [
    "int_range", "fake_quantize", "fake_quantize_forward", "qparams_from_range", "fold_bn", "PROTOCOLS", "QuantConfig",
    "Quantizer", "QuantConv2d", "head_convs", "quantize_model", "quant_layers", "set_quant_state",
    "collect_activations", "calibrate_minmax", "quantization_off", "quant_state_kept", "eval_mode", "select_layers",
    "QuantSiLU", "deploy_quantizers", "calibrate_deploy",
]

SCALE_FLOOR = 1e-8  # scales are at least SCALE_FLOOR * max(1, |lo|, |hi|): finite and positive for all-zero data


# ------------------------------------------------------------------ checks
def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit quantizer.

    Args:
        bits: bit width ``b``, an integer in 2..8.
        symmetric: ``True`` gives ``[-2^(b-1), 2^(b-1) - 1]`` (zero point 0), ``False`` gives ``[0, 2^b - 1]``.
    """
    bits = check_bits("bits", bits)
    check_bool("symmetric", symmetric)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


# ------------------------------------------------------------ fake quantize
def fake_quantize_forward(x: Tensor, scale: Tensor, zero_point: Tensor,
                          qmin: int, qmax: int, *,
                          out: Tensor | None = None,
                          return_mask: bool = False):
    """The forward of :func:`fake_quantize` without checks or autograd: the
    one kernel every caller shares.

    Args:
        x: input, any shape.
        scale: ``s``, broadcastable to ``x``, same dtype as ``x``.
        zero_point: ``z``, integer-valued, broadcastable to ``x``, same
            dtype as ``x``.
        qmin, qmax: integer range.
        out: optional buffer of the broadcast shape (the scale search uses
            it to avoid allocations).
        return_mask: also return the STE mask ``qmin <= round(x / s) + z <=
            qmax``.

    Returns:
        ``x_hat``, or ``(x_hat, mask)`` with ``return_mask``.
    """
    q = torch.mul(x, 1.0 / scale, out=out)  # reciprocal multiply, as torch
    q.round_().add_(zero_point)  # torch.round: half to even, as nearbyint
    mask = ((q >= qmin) & (q <= qmax)) if return_mask else None
    q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    return (q, mask) if return_mask else q


class _FakeQuantize(torch.autograd.Function):
    """Fake quantization with the clipped STE for ``x`` and the LSQ gradient for ``scale``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        x_hat, mask = fake_quantize_forward(x, scale, zero_point, qmin, qmax, return_mask=True)
        ctx.save_for_backward(mask, *((x, x_hat, scale) if ctx.needs_input_grad[1] else ()))
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        mask, *rest = ctx.saved_tensors
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            x, x_hat, scale = rest
            inv = 1.0 / scale
            # d x_hat / d s: round(x/s) - x/s inside the range (STE through round), the clamp level q - z outside
            d = torch.where(mask, (x_hat - x) * inv, torch.round(x_hat * inv))
            grad_scale = (grad * d).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None, None


def _broadcast_qparams(x: Tensor, scale, zero_point, axis: int | None) -> tuple[Tensor, Tensor]:
    # Tensor.to is differentiable, so a learnable scale keeps its gradient
    if isinstance(scale, Tensor):
        scale = scale.to(x.device, x.dtype)
    else:
        scale = torch.tensor(scale, dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(zero_point).to(x.device, x.dtype)
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(f"per tensor (axis=None) needs one scale and one zero_point, got shapes "
                             f"{tuple(scale.shape)} and {tuple(zero_point.shape)}")
        return scale.reshape(()), zero_point.reshape(())
    c = x.shape[axis]
    if scale.shape != (c,) or zero_point.shape != (c,):
        raise ValueError(f"per channel along axis={axis} needs scale and zero_point of shape ({c},), got "
                         f"{tuple(scale.shape)} and {tuple(zero_point.shape)}")
    shape = [1] * x.dim()
    shape[axis] = c
    return scale.view(shape), zero_point.view(shape)


def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """Uniform affine fake quantization ``x_hat = (clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s``.

    The forward equals ``torch.fake_quantize_per_tensor_affine`` (``axis=None``) and
    ``torch.fake_quantize_per_channel_affine`` bit for bit. Gradients: the clipped STE for ``x``; for ``scale``
    (when it requires grad) the LSQ gradient ``round(x/s) - x/s`` inside the range and ``q - z`` outside it.
    LSQ's gradient scale ``1 / sqrt(N * qmax)`` is not applied here; the caller that learns ``s`` applies it.

    Args:
        x: input ``X``, any shape, finite.
        scale: ``s > 0``: a number or one-element tensor per tensor; shape ``(x.shape[axis],)`` per channel.
        zero_point: ``z``, integer-valued, in ``[qmin, qmax]``, same shape as ``scale``.
        qmin, qmax: integer range, ``qmin < qmax`` (see :func:`int_range`).
        axis: ``None`` for per tensor, else the channel dimension of ``x``.

    Returns:
        ``x_hat``, same shape, dtype and memory format as ``x``.
    """
    check_finite(x)
    qmin, qmax = check_int("qmin", qmin), check_int("qmax", qmax)
    if not qmin < qmax:
        raise ValueError(f"qmin={qmin} and qmax={qmax}: qmin must be less than qmax")
    axis = check_axis(axis, x.dim())
    s, z = _broadcast_qparams(x, scale, zero_point, axis)
    if not (torch.isfinite(s) & (s > 0)).all():
        raise ValueError(f"scale must be finite and > 0, got {scale if s.numel() == 1 else s.flatten().tolist()}")
    if not ((z == z.round()) & (z >= qmin) & (z <= qmax)).all():
        raise ValueError(f"zero_point must be an integer in qmin..qmax = {qmin}..{qmax}, got "
                         f"{z.flatten().tolist()}")
    return _FakeQuantize.apply(x, s, z.detach(), qmin, qmax)


def qparams_from_range(lo: Tensor | float, hi: Tensor | float, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map the float range ``[lo, hi]`` onto the integer range (method page, section 2).

    The range is first widened to contain 0 (``lo = min(lo, 0)``, ``hi = max(hi, 0)``). Symmetric:
    ``s = max(-lo, hi) / (2^(b-1) - 1)``, ``z = 0``. Asymmetric: ``s = (hi - lo) / (2^b - 1)``,
    ``z = clamp(round(-lo / s), 0, 2^b - 1)``. Computed in float64; ``s`` is floored at
    ``SCALE_FLOOR * max(1, |lo|, |hi|)`` so an all-zero range still gives a finite, positive scale.

    Args:
        lo, hi: range ends, numbers or tensors of any (broadcastable) shape, e.g. ``(C,)`` per channel.
        bits, symmetric: as in :func:`int_range`.

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors of the broadcast shape.
    """
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = torch.as_tensor(lo).double(), torch.as_tensor(hi).double()
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("lo and hi must be finite: a range with NaN or inf has no scale")
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    lo, hi = torch.broadcast_tensors(lo, hi)
    floor = SCALE_FLOOR * torch.maximum(-lo, hi).clamp(min=1.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).maximum(floor).float()
        return scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    scale = ((hi - lo) / (qmax - qmin)).maximum(floor).float()
    zero_point = torch.round(-lo / scale.double()).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


# --------------------------------------------------------------- BN folding
_BATCH_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """``W' = W * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn!r}: it has no running statistics (track_running_stats=False)")
    if bn.running_mean.numel() != conv.out_channels:
        raise ValueError(f"cannot fold {bn!r} into {conv!r}: {bn.running_mean.numel()} features for "
                         f"{conv.out_channels} output channels")
    w = conv.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        w.copy_(w.double() * factor.view(-1, *([1] * (w.dim() - 1))))  # copy_ keeps the memory format
        new_bias = ((bias - mean) * factor + beta).to(w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(w.device))
        else:
            conv.bias.copy_(new_bias)


def fold_bn(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every BatchNorm that directly follows a conv folded into that conv.

    Two patterns are recognised (others are left as they are):

    * a module with attributes ``conv<k>`` (an ``nn.Conv2d``) and ``bn<k>`` (``nn.BatchNorm2d`` or torchvision's
      ``FrozenBatchNorm2d``) with the same suffix ``<k>`` (none, or e.g. ``1``), such as
      :class:`detptq_mini.model.ConvBNAct` (``conv``/``bn``) or torchvision's ResNet blocks
      (``conv1``/``bn1`` ...); ``bn<k>`` becomes ``nn.Identity``;
    * an ``nn.Sequential`` in which an ``nn.Conv2d`` is immediately followed by such a BatchNorm; the BatchNorm
      is replaced by ``nn.Identity`` (indices are kept).

    The conv gets a bias if it had none. Folding uses the running statistics, so the copy computes the same
    function as ``model`` in eval mode (to float rounding). The input model is not modified.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, conv in list(module._modules.items()):
            bn_name = "bn" + name[len("conv"):]
            bn = module._modules.get(bn_name)
            if name.startswith("conv") and isinstance(conv, nn.Conv2d) and isinstance(bn, _BATCH_NORMS):
                _fold_into(conv, bn)
                module._modules[bn_name] = nn.Identity()
        if isinstance(module, nn.Sequential):
            items = list(module._modules.items())
            for (_, a), (name_b, b) in zip(items, items[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, _BATCH_NORMS):
                    _fold_into(a, b)
                    module._modules[name_b] = nn.Identity()
    return model


# ------------------------------------------------------------------ config
LayerProtocol = Literal["ours", "head-fp"]
#: The layer protocols, which convs are quantized at all (method page, section 7).
#: ``"ours"``: every conv; ``"head-fp"``: every conv but those of the detection head, which stay FP (QDrop's public
#: COCO code).
PROTOCOLS: tuple[str, ...] = get_args(LayerProtocol)


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize_model` quantizes a model (the defaults are those of the method page, section 2).

    Attributes:
        w_bits: weight bit width, 2..8.
        a_bits: activation (conv input) bit width, 2..8.
        w_symmetric: symmetric weight range (zero point 0) or asymmetric.
        w_per_channel: one weight scale per output channel (axis 0) or one per tensor.
        a_symmetric: symmetric activation range or asymmetric (the default; activations are per tensor).
        stem_8bit: the stem conv (the first conv) at W8A8.
        pred_8bit: the head's final prediction convs (``*.pred``) at W8A8 (nothing to do with ``"head-fp"``,
            which leaves them FP).
        protocol: which convs are quantized, one of :data:`PROTOCOLS`: ``"ours"`` every conv; ``"head-fp"`` every
            conv but those of the head units (``model.head_units()``), which stay plain FP ``nn.Conv2d`` (QDrop's
            public COCO code quantizes the backbone and the neck only).
        deploy: also build the deploy quantizers (see the module docstring): each conv's output and each SiLU's
            sigmoid, 8-bit, so that the model computes what the fused int8 ONNX graph computes. Needs
            ``a_bits = 8`` and ``w_bits`` 8 or 4 (W4A8: 4-bit weights, everything else 8-bit). Omitted from
            :meth:`to_dict` when False, so older reports read the same.
    """

    w_bits: int = 4
    a_bits: int = 4
    w_symmetric: bool = True
    w_per_channel: bool = True
    a_symmetric: bool = False
    stem_8bit: bool = True
    pred_8bit: bool = True
    protocol: LayerProtocol = "ours"
    deploy: bool = False

    def __post_init__(self):
        for f in ("w_bits", "a_bits"):
            object.__setattr__(self, f, check_bits(f, getattr(self, f)))
        for f in ("w_symmetric", "w_per_channel", "a_symmetric", "stem_8bit", "pred_8bit", "deploy"):
            check_bool(f, getattr(self, f))
        check_choice("protocol", self.protocol, PROTOCOLS)
        if self.deploy and (self.a_bits != 8 or self.w_bits not in (4, 8)):
            raise ValueError(f"deploy=True needs a_bits=8 and w_bits 8 or 4 (the fused graph: allowed W8A8, "
                             f"W4A8), got W{self.w_bits}A{self.a_bits}")

    def to_dict(self) -> dict:
        """The config as a plain dict (JSON-ready); ``deploy`` only when True."""
        out = dataclasses.asdict(self)
        if not self.deploy:
            del out["deploy"]
        return out


# ----------------------------------------------------------------- modules
class Quantizer(nn.Module):
    """A fake quantizer that owns its quantization parameters.

    Args:
        bits: bit width ``b``, 2..8.
        symmetric: integer range (see :func:`int_range`).
        axis: ``None`` (per tensor) or ``0`` (per channel along dim 0, e.g. a conv weight's output channels).
        channels: number of channels when ``axis=0``.

    Buffers: ``scale`` (float32, shape ``()`` or ``(channels,)``), ``zero_point`` (int32, same shape) and
    ``calibrated`` (bool). ``enabled`` (a plain attribute) switches quantization on and off: ``forward`` is the
    identity when it is off, :func:`fake_quantize` when it is on, and an error when it is on but no parameters
    were set (:meth:`set_qparams`). ``scale`` may be replaced by an ``nn.Parameter`` of the same shape to learn it.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None, channels: int | None = None):
        super().__init__()
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.bits, self.symmetric = int(bits), symmetric
        if axis not in (None, 0) or isinstance(axis, bool):
            raise ValueError(f"axis={axis!r} must be None (per tensor) or 0 (per channel)")
        if axis == 0:
            channels = check_int("channels", channels, 1, hint="when axis=0")
        self.axis = axis
        shape = () if axis is None else (channels,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("calibrated", torch.tensor(False))
        self.enabled = True

    def set_qparams(self, scale: Tensor | float, zero_point: Tensor | int) -> None:
        """Set ``s`` and ``z`` (shapes as the buffers; per tensor accepts any one-element value)."""
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1 if self.axis == 0 else ())
        zero_point = torch.as_tensor(zero_point).reshape(-1 if self.axis == 0 else ())
        if scale.shape != self.scale.shape or zero_point.shape != self.zero_point.shape:
            raise ValueError(f"scale and zero_point must have shape {tuple(self.scale.shape)}, got "
                             f"{tuple(scale.shape)} and {tuple(zero_point.shape)}")
        if not (torch.isfinite(scale) & (scale > 0)).all():
            raise ValueError("scale must be finite and > 0")
        if not ((zero_point == zero_point.round()) & (zero_point >= self.qmin) & (zero_point <= self.qmax)).all():
            raise ValueError(f"zero_point must be an integer in {self.qmin}..{self.qmax}")
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            self.calibrated.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(f"{self!r} is enabled but has no scale yet: run calibrate_minmax(...) or "
                               "set_qparams(...) first, or disable it with set_quant_state(...)")
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, enabled={self.enabled}, "
                f"calibrated={bool(self.calibrated)}")


class QuantConv2d(nn.Module):
    """An ``nn.Conv2d`` (kept as ``.conv``) with fake-quantized weights and input.

    ``forward(x) = conv2d(input_quantizer(x), weight_quantizer(W), b)``. Quantizing the *input* of every conv
    covers the tensors that concatenations and residual adds produce.

    Args:
        conv: the float conv (weights ``W``: ``(C_out, C_in / groups, kH, kW)``, BN already folded).
        w_bits, a_bits: bit widths of the weights and of the input activation.
        w_symmetric, w_per_channel: weight quantizer range and granularity (axis 0 = output channels).
        a_symmetric: input quantizer range (per tensor).
        deploy: also an ``output_quantizer`` (8-bit asymmetric per tensor, created disabled) on the conv's output,
            the tensor an integer conv writes; ``None`` without ``deploy``.
    """

    def __init__(self, conv: nn.Conv2d, w_bits: int = 8, a_bits: int = 8, w_symmetric: bool = True,
                 w_per_channel: bool = True, a_symmetric: bool = False, deploy: bool = False):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        self.conv = conv
        self.weight_quantizer = Quantizer(w_bits, w_symmetric, 0 if w_per_channel else None, conv.out_channels)
        self.input_quantizer = Quantizer(a_bits, a_symmetric, None)
        self.output_quantizer = None
        if check_bool("deploy", deploy):
            self.output_quantizer = Quantizer(8, False, None)
            self.output_quantizer.enabled = False

    def set_quant_state(self, weights: bool | None = None, acts: bool | None = None) -> None:
        """Switch weight and/or input quantization on (``True``) or off (``False``); ``None`` leaves it."""
        if weights is not None:
            self.weight_quantizer.enabled = check_bool("weights", weights)
        if acts is not None:
            self.input_quantizer.enabled = check_bool("acts", acts)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.conv.weight), self.conv.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantSiLU(nn.Module):
    """SiLU with its sigmoid quantized, ``x * Q(sigmoid(x))``: the form in which an integer runtime fuses it (an
    int8 sigmoid, then an int8 product). A deploy quantizer (:class:`QuantConfig` ``deploy``); ``gate_quantizer``
    is 8-bit asymmetric per tensor and starts disabled, and then this is exactly ``nn.SiLU``."""

    def __init__(self):
        super().__init__()
        self.gate_quantizer = Quantizer(8, False, None)
        self.gate_quantizer.enabled = False

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate_quantizer(torch.sigmoid(x))


# ------------------------------------------------------------ model level
def _conv_order(model: nn.Module) -> list[str]:
    """Every ``nn.Conv2d`` by module path: ``model.conv_names()`` order when the model has it, then the rest."""
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first = list(model.conv_names()) if hasattr(model, "conv_names") else []
    return first + [n for n in found if n not in set(first)]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def head_convs(model: nn.Module) -> tuple[str, ...]:
    """The convs of ``model``'s head units (:meth:`~detptq_mini.model.UnitDetector.head_units`), in forward order:
    the convs the layer protocol ``"head-fp"`` leaves in FP. ``model`` must be a UnitDetector (a ValueError
    otherwise: only a detector knows its head)."""
    if not isinstance(model, UnitDetector):
        raise ValueError(f"protocol='head-fp' needs the model's head units, and model is not a UnitDetector (got "
                         f"{type(model).__name__}); use protocol='ours', or a detptq_mini.model.UnitDetector "
                         "(Detector, RetinaNetAdapter or another subclass)")
    head = set(model.head_units())
    return tuple(n for n in model.conv_names() if model.unit_of(n) in head)


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *,
                   pred_names: Iterable[str] | None = None) -> nn.Module:
    """A quantized copy of ``model``: BN folded, every ``nn.Conv2d`` replaced in place by a :class:`QuantConv2d`.

    Module paths do not change (a unit looked up with ``get_submodule`` is still found). Bits per layer come
    from ``config``: ``w_bits``/``a_bits`` everywhere, except W8A8 for the stem (the first conv in forward
    order: ``backbone.stem.conv`` for the detector) when ``config.stem_8bit`` and for the prediction convs when
    ``config.pred_8bit``. The prediction convs are ``pred_names`` if given, else the convs whose name ends in
    ``.pred`` (the detector's six). Forward order is ``model.conv_names()`` when the model has it, else module
    registration order. With ``config.protocol == "head-fp"`` the convs of the head units (:func:`head_convs`;
    ``model`` must then be a :class:`~detptq_mini.model.UnitDetector`) stay plain FP ``nn.Conv2d`` (BN folded):
    they are no quantized layers, so every later step (scale search, p selection, reconstruction) skips them,
    and ``pred_8bit`` has nothing left to do. The quantizers start enabled but uncalibrated: run
    :func:`calibrate_minmax` (or set every scale) before a quantized forward. ``model`` itself is not modified.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    if any(isinstance(m, QuantConv2d) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantConv2d layers)")
    fp_convs = set(head_convs(model)) if config.protocol == "head-fp" else set()
    qmodel = fold_bn(model)
    order = _conv_order(qmodel)
    if not order:
        raise ValueError("model has no nn.Conv2d to quantize")
    if pred_names is None:
        preds = {n for n in order if n.endswith(".pred")}
    else:
        preds = {pred_names} if isinstance(pred_names, str) else set(pred_names)
        unknown = sorted(preds - set(order))
        if unknown:
            raise ValueError(f"pred_names has {unknown} that are not convs of the model; allowed: {', '.join(order)}")
    if not [n for n in order if n not in fp_convs]:
        raise ValueError(f"protocol={config.protocol!r} leaves every conv of the model in FP: nothing to quantize")
    for name in order:
        if name in fp_convs:
            continue
        w8a8 = (config.stem_8bit and name == order[0]) or (config.pred_8bit and name in preds)
        w_bits, a_bits = (8, 8) if w8a8 else (config.w_bits, config.a_bits)
        layer = QuantConv2d(qmodel.get_submodule(name), w_bits=w_bits, a_bits=a_bits,
                            w_symmetric=config.w_symmetric, w_per_channel=config.w_per_channel,
                            a_symmetric=config.a_symmetric, deploy=config.deploy)
        _set_submodule(qmodel, name, layer)
    if config.deploy:  # a SiLU right after a quantized conv (attributes conv / act, as ConvBNAct) gets its gate
        for module in list(qmodel.modules()):
            if isinstance(getattr(module, "conv", None), QuantConv2d) and isinstance(getattr(module, "act", None),
                                                                                    nn.SiLU):
                module.act = QuantSiLU()
    return qmodel


def quant_layers(qmodel: nn.Module) -> dict[str, QuantConv2d]:
    """Every :class:`QuantConv2d` of ``qmodel`` by module path (the FP conv's name), in forward order."""
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantConv2d)}
    order = []
    if hasattr(qmodel, "conv_names"):  # the wrapped convs are listed as "<name>.conv"
        for n in qmodel.conv_names():
            key = n if n in layers else n.removesuffix(".conv")
            if key in layers and key not in order:
                order.append(key)
    order += [n for n in layers if n not in set(order)]
    return {n: layers[n] for n in order}


def select_layers(qmodel: nn.Module, layers: Iterable[str] | str | None = None,
                  name: str = "layers") -> dict[str, QuantConv2d]:
    """The quantized layers named by ``layers`` (a name, names, or ``None`` for all), in the order given.

    The one place a layer is looked up by name: an unknown name is an error that lists the allowed ones, and a
    model without quantized layers is an error that says to quantize it first. ``name`` is the argument's name
    in the error (``"layers"``, ``"layer"``).
    """
    all_layers = quant_layers(qmodel)
    if not all_layers:
        raise ValueError("qmodel has no QuantConv2d layers: quantize it with quantize_model first")
    if layers is None:
        return all_layers
    names = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(f"{name} has {unknown} that are not quantized layers; allowed: {', '.join(all_layers)}")
    return {n: all_layers[n] for n in names}


def set_quant_state(qmodel: nn.Module, weights: bool | None = None, acts: bool | None = None,
                    layers: Iterable[str] | str | None = None) -> None:
    """Switch weight and/or activation quantization on or off, for ``layers`` (names) or all layers.

    ``weights``/``acts``: ``True`` on, ``False`` off, ``None`` unchanged.
    """
    for layer in select_layers(qmodel, layers).values():
        layer.set_quant_state(weights, acts)


@contextmanager
def quant_state_kept(qmodel: nn.Module) -> Iterator[dict[str, QuantConv2d]]:
    """Within the block the quantizers' on/off states may change; they are restored after (also on error).

    Yields the quantized layers by name.
    """
    layers = quant_layers(qmodel)
    saved = {n: (m.weight_quantizer.enabled, m.input_quantizer.enabled) for n, m in layers.items()}
    deploy = {q: q.enabled for q in deploy_quantizers(qmodel).values()}
    try:
        yield layers
    finally:
        for n, (w, a) in saved.items():
            layers[n].set_quant_state(w, a)
        for q, on in deploy.items():
            q.enabled = on


@contextmanager
def quantization_off(qmodel: nn.Module) -> Iterator[None]:
    """Within the block every quantizer of ``qmodel`` is off (the FP forward), the deploy quantizers too; the
    states are restored after."""
    with quant_state_kept(qmodel) as layers:
        for m in layers.values():
            m.set_quant_state(False, False)
        for q in deploy_quantizers(qmodel).values():
            q.enabled = False
        yield


@contextmanager
def eval_mode(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Within the block ``model`` is in eval mode (and, by default, gradients are off); every submodule's
    train/eval mode is restored after, also on error. Yields the model."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m, training in modes.items():
            m.train(training)


def collect_activations(model: nn.Module, images, layers: Iterable[str] | None = None, max_elements: int = 2**20,
                        seed: int = 0, batch_size: int = 32, quantized: bool = False) -> dict[str, Tensor]:
    """The input activations of the named convs over the calibration images, as bounded 1-D samples.

    Runs ``model`` (in eval mode without gradients; for a quantized model with every quantizer off, i.e. the FP
    activations, unless ``quantized=True``, which keeps its current quantization state) on
    ``images`` in batches, with a forward pre-hook on each layer. A layer whose inputs total at most
    ``max_elements`` values keeps all of them (in order); otherwise it keeps exactly ``max_elements`` values
    drawn uniformly with replacement, each batch contributing in proportion to its number of images, from a
    ``torch.Generator`` seeded with ``seed`` and the layer name. The sample always contains the layer's exact
    minimum and maximum (its first two entries), so the min-max range of a sample is the range of the data.
    A conv that runs several times in one forward (a module shared by several inputs, such as RetinaNet's head,
    which runs on every pyramid level) has one input distribution: the inputs of all its calls in a batch
    are pooled before sampling.

    Args:
        model: a model whose convs (``nn.Conv2d`` or :class:`QuantConv2d`) are named in ``layers``.
        images: ``(N, 3, H, W)`` tensor (or a data set with ``.images()``), ``N >= 1``.
        layers: conv module paths; default all convs (all quantized layers for a quantized model), in order.
        max_elements: per-layer bound, at least 2.
        seed: non-negative integer.
        batch_size: images per forward.
        quantized: collect with the model's quantizers as they are (the inputs a quantized prefix produces).

    Returns:
        ``{name: 1-D tensor}`` in the order of ``layers``.
    """
    images = check_images(images, "images")
    check_bool("quantized", quantized)
    max_elements = check_int("max_elements", max_elements, 2)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    if layers is None:
        modules = quant_layers(model) or {n: model.get_submodule(n) for n in _conv_order(model)}
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        allowed = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, QuantConv2d))}
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ValueError(f"layers has {unknown} that are not convs of the model; "
                             f"allowed: {', '.join(sorted(allowed))}")
        modules = {n: model.get_submodule(n) for n in names}
    n_images = images.shape[0]
    state = {n: {"parts": [], "calls": [], "lo": None, "hi": None, "total": 0} for n in modules}
    # one generator per layer, seeded from (seed, name): mt19937 keeps 32 bits of a seed, so hash both together
    gens = {n: torch.Generator().manual_seed(zlib.crc32(f"{seed}:{n}".encode())) for n in modules}
    batch = {"index": -1, "start": 0, "end": 0}

    def hook(name):
        def fn(module, args):
            st, x = state[name], args[0].detach()
            lo, hi = x.min(), x.max()
            st["lo"] = lo if st["lo"] is None else torch.minimum(st["lo"], lo)
            st["hi"] = hi if st["hi"] is None else torch.maximum(st["hi"], hi)
            st["calls"].append(x.reshape(-1))  # sampled once the batch's forward is over (see flush)
        return fn

    def flush():
        """Sample each layer's inputs of this batch (all its calls pooled: one call unless the conv is shared)."""
        for name, st in state.items():
            if not st["calls"]:
                continue
            flat = st["calls"][0] if len(st["calls"]) == 1 else torch.cat(st["calls"])
            st["calls"] = []
            st["total"] += flat.numel()
            if n_images * (flat.numel() // (batch["end"] - batch["start"])) <= max_elements:
                st["parts"].append(flat.clone())
            else:  # this batch's share of the sample: images [start, end) of N
                k = max_elements * batch["end"] // n_images - max_elements * batch["start"] // n_images
                idx = torch.randint(0, flat.numel(), (k,), generator=gens[name]).to(flat.device)
                st["parts"].append(flat[idx])

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        with eval_mode(model), (contextlib.nullcontext() if quantized else quantization_off(model)):
            for start in range(0, n_images, batch_size):
                batch.update(index=batch["index"] + 1, start=start, end=min(start + batch_size, n_images))
                model(images[start:batch["end"]].to(device))
                flush()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, st in state.items():
        if not st["parts"]:
            raise ValueError(f"layer {name!r} never ran on the calibration images")
        sample = torch.cat(st["parts"])
        if st["total"] > max_elements:
            sample[0], sample[1] = st["lo"], st["hi"]
        out[name] = sample
    return out


def calibrate_minmax(qmodel: nn.Module, images, batch_size: int = 32) -> nn.Module:
    """Min-max calibration of every quantizer of ``qmodel`` (in place; returns ``qmodel``).

    Weights: the range of each output channel (or of the tensor) of the folded weights, so symmetric
    per-channel weights get ``s = max|W_c| / (2^(b-1) - 1)``. Activations: the min/max of each conv's input
    over ``images``, collected with quantization off (FP statistics), widened to contain 0, then
    ``s = (hi - lo) / (2^b - 1)``, ``z = clamp(round(-lo / s), 0, 2^b - 1)`` (:func:`qparams_from_range`).
    The enabled/disabled state of every quantizer is left as it was.
    """
    layers = select_layers(qmodel, None)
    for layer in layers.values():
        wq, w = layer.weight_quantizer, layer.conv.weight.detach()
        rows = w.reshape(1, -1) if wq.axis is None else w.reshape(w.shape[0], -1)
        lo, hi = rows.amin(1), rows.amax(1)
        wq.set_qparams(*qparams_from_range(lo.cpu(), hi.cpu(), wq.bits, wq.symmetric))
    with quantization_off(qmodel):  # the extremes are always in the sample, so a small one suffices
        samples = collect_activations(qmodel, images, list(layers), max_elements=1024, batch_size=batch_size)
    for name, layer in layers.items():
        iq, x = layer.input_quantizer, samples[name]
        iq.set_qparams(*qparams_from_range(x.min().cpu(), x.max().cpu(), iq.bits, iq.symmetric))
    return qmodel


def deploy_quantizers(qmodel: nn.Module) -> dict[str, Quantizer]:
    """The deploy quantizers of ``qmodel`` by module path (``<conv>.output_quantizer``, ``<act>.gate_quantizer``),
    in module order; empty for a model quantized without ``deploy``."""
    out = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantConv2d) and m.output_quantizer is not None:
            out[f"{name}.output_quantizer"] = m.output_quantizer
        elif isinstance(m, QuantSiLU):
            out[f"{name}.gate_quantizer"] = m.gate_quantizer
    return out


def calibrate_deploy(qmodel: nn.Module, images, batch_size: int = 32, search=None, max_elements: int = 2**16,
                     seed: int = 0) -> nn.Module:
    """Calibrate the deploy quantizers of ``qmodel`` (in place), then switch them on; returns it.

    Run after the method has set every conv's scales: each quantizer sees the quantized model's own tensor (a
    conv's output, a SiLU's sigmoid) over ``images``, with the weight and input quantizers as they are and the
    deploy quantizers off while the tensors are collected. Each tensor is reduced to a seeded sample of at most
    ``max_elements`` values per batch that always holds its minimum and maximum. The scale: min-max
    (:func:`qparams_from_range`, 8-bit asymmetric, the range widened to contain 0) by default; ``search``, a
    callable ``sample -> (scale, zero_point)``, replaces it (``run_ptq`` passes the L2 scale search).
    A ValueError if the model has none (quantize it with ``QuantConfig(deploy=True)``).
    """
    images = check_images(images, "images")
    batch_size = check_int("batch_size", batch_size, 1)
    max_elements = check_int("max_elements", max_elements, 2)
    seed = check_int("seed", seed, 0)
    if search is not None and not callable(search):
        raise ValueError(f"search must be None (min-max) or a callable sample -> (scale, zero_point), got "
                         f"{type(search).__name__}")
    quantizers = deploy_quantizers(qmodel)
    if not quantizers:
        raise ValueError("qmodel has no deploy quantizers: quantize it with QuantConfig(deploy=True) "
                         "(run_ptq(..., deploy=True); command line: quantize --deploy)")
    samples: dict[str, list[Tensor]] = {}
    gens = {n: torch.Generator().manual_seed(zlib.crc32(f"{seed}:{n}".encode())) for n in quantizers}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1)
            part = [x.min().view(1), x.max().view(1)]
            if x.numel() > max_elements:
                x = x[torch.randint(0, x.numel(), (max_elements,), generator=gens[name]).to(x.device)]
            samples.setdefault(name, []).extend(part + [x.clone()])
        return fn

    for q in quantizers.values():
        q.enabled = False
    handles = [q.register_forward_pre_hook(hook(n)) for n, q in quantizers.items()]
    device = next(iter(qmodel.parameters()), torch.empty(0)).device
    try:
        with eval_mode(qmodel):
            for start in range(0, len(images), batch_size):
                qmodel(images[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    for name, q in quantizers.items():
        if name not in samples:
            raise ValueError(f"deploy quantizer {name!r} never ran on the calibration images")
        x = torch.cat(samples[name]).float().cpu()
        q.set_qparams(*(qparams_from_range(x.min(), x.max(), q.bits, q.symmetric) if search is None else search(x)))
        q.enabled = True
    return qmodel
