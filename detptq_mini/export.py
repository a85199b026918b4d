"""ONNX export of a W8A8 (or W4A8) quantized detector as a QDQ graph, and its check in ONNX Runtime.

A deployment runtime does not know our :class:`~detptq_mini.quant.Quantizer`; it knows the ONNX operators
``QuantizeLinear`` (float -> int8/uint8) and ``DequantizeLinear`` (back to float). A *QDQ graph* puts a
``QuantizeLinear -> DequantizeLinear`` pair wherever the fake-quant model rounds, so it computes the same
function, and a runtime may fuse each pair with the conv that follows into an integer kernel::

    x --Q(s_a, z_a, uint8)--DQ--+
                                Conv -- ...
         W_q (int8) --DQ(s_w, 0, axis 0)--+

    (a pair on the input of every conv; its weight stored as the int8
    codes, read by a DequantizeLinear)

The weights are stored as integers, not as float weights followed by a ``QuantizeLinear``: the exporters write
the latter (the export copy's weight quantizer is a Q/DQ pair), and :func:`export_onnx` then replaces each
conv's float weight and its ``QuantizeLinear`` by an int8 initializer holding exactly the torch model's codes
``clamp(round(W * (1/s)) + z)``, with the same per-channel scales and zero points. The function is unchanged
(ONNX Runtime's outputs are the same bit for bit, and it fuses the same integer convs), and the file is a
quarter of the float form's (1.5 MB against 5.5 MB for the shipped W8A8 detector; ONNX Runtime's own
``quantize_static`` writes 1.6 MB).

The mapping from our quantizer (method page, section 2) is exact at 8 bits: activations are asymmetric per tensor
in ``[0, 255]`` (uint8, zero point in range), weights symmetric per output channel in ``[-128, 127]`` (int8,
zero point 0; per-channel ``DequantizeLinear`` needs opset >= 13). 4-bit symmetric weights (W4A8) are exported
too: their codes fit int8 with the same scale, so the graph stays exact; ``weights="int4"`` stores them in ONNX's
int4 type instead (opset 21, two codes a byte), which ONNX Runtime 1.32 loads but runs as float convs.
Activations must be 8-bit: ONNX Runtime has no integer conv for 4-bit inputs (:func:`check_exportable` says why a model is not exported;
:func:`detptq_mini.deploy.conv_kernel` shows what ONNX Runtime runs for each bit width). A model quantized
with the layer protocol ``"head-fp"`` exports too: its head convs are plain FP convs, so they are plain ``Conv``
nodes of the graph, without Q/DQ pairs.

:func:`to_qdq` makes an export copy of a quantized model in which every :class:`~detptq_mini.quant.QuantConv2d`
calls torch's own quantization ops, which the exporters translate into ``QuantizeLinear``/``DequantizeLinear``:
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` for the TorchScript
exporter (``dynamo=False``, the default), and the ``quantized_decomposed`` quantize/dequantize ops (PT2E's)
for the ``torch.export`` based exporter (``dynamo=True``). Both compute bit for bit what
:func:`detptq_mini.quant.fake_quantize` computes (reciprocal multiply, round half to even), so the copy's
torch forward equals the quantized model's. The quantizers themselves are not changed.

The exported graph holds the dense head outputs (``cls0..2``, ``box0..2``, a
:class:`~detptq_mini.model.DenseOutputs`); decoding and NMS stay in torch (:func:`detptq_mini.model.postprocess`),
so :class:`OnnxDetector` plugs an ONNX Runtime session into :func:`detptq_mini.evaluate.evaluate_model`.

ONNX Runtime does not reproduce the fake-quant model bit for bit: its convs accumulate floats in another order,
so now and then a value lands on the other side of a rounding boundary, one integer code away, and the next
layers carry that on. So the check has three parts: :func:`check_layers` runs every exported conv in ONNX
Runtime on the fake-quant model's own input to that conv and requires its output within one quantization step
(``s_a * sum_k |W_q[c, k]|``: every input of the output one integer code away); :func:`compare_outputs`
reports how far the whole network's outputs drift, in the same units; and the mAP of the exported graph
(:class:`OnnxDetector`) is compared with the fake-quant model's.

On an x86 CPU without VNNI (AVX2 only) the one-step bound can fail for another reason: ONNX Runtime's uint8 x int8
kernels add pairs of products in int16 with saturation, so a conv whose input codes and weights are both large
(the stem, which reads 8-bit image values) lands several steps off. Measured on such a machine (the min-max W8A8
deploy model, 256 calibration images, 16 val images): the stem 13 steps, two convs 3-5, five 1.1-2.3; the same codes as
uint8 weights with zero point 128 (uint8 x uint8 kernels, no saturation) kept every conv within one step but ran
1.09x the FP32 graph's time instead of 0.85x, and moved the mAP by less than 0.001, so the weights stay int8.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checks import check_bool, check_choice, check_images, check_int, shown
from .model import DenseOutputs
from .quant import QuantConv2d, QuantSiLU, deploy_quantizers, eval_mode, quant_layers

__all__ = [
    "OPSET", "OUTPUT_NAMES", "GRAPHS", "WEIGHTS", "INT4_OPSET", "check_exportable", "to_qdq", "to_float",
    "export_onnx", "qdq_summary", "onnx_session",
    "OnnxDetector", "compare_outputs", "check_layers", "latency_per_image",
]

#: The default ONNX opset of :func:`export_onnx`, the TorchScript exporter's (``dynamo=True`` exports at 18, its
#: lowest); both are >= 13, as per-channel QDQ needs.
OPSET = 17
#: The names of the exported graph's outputs, the dense head outputs (class logits, then boxes, levels in order).
OUTPUT_NAMES: tuple[str, ...] = ("cls0", "cls1", "cls2", "box0", "box1", "box2")
_RANGES = {(0, 255): torch.uint8, (-128, 127): torch.int8}  # the integer ranges ONNX QuantizeLinear has at 8 bits
#: The graphs :func:`export_onnx` writes:
#: ``"fused"``, every tensor an integer kernel needs quantized (the deploy quantizers), and ``"qdq"``, Q/DQ pairs on
#: the conv inputs and weights only (the first export: float convs).
GRAPHS: tuple[str, ...] = ("fused", "qdq")
#: How :func:`export_onnx` stores 4-bit weights:
#: ``"int8"`` (their codes in int8 initializers, opset 17: ONNX Runtime runs such a conv as an integer conv, as any
#: int8 one) or ``"int4"`` (ONNX's int4 type, opset 21: half the bytes; ONNX Runtime 1.32 dequantizes them and runs
#: a float conv). 8-bit weights are int8 either way.
WEIGHTS: tuple[str, ...] = ("int8", "int4")
INT4_OPSET = 21  #: The first opset whose ``DequantizeLinear`` takes int4 (the opset of ``weights="int4"``).


def check_exportable(qmodel: nn.Module) -> dict[str, QuantConv2d]:
    """The quantized convs of ``qmodel``, after checking that each maps onto ONNX QDQ with 8-bit activations.

    Activations (every conv's input) must be 8-bit; weights 8-bit, or 4-bit symmetric (W4A8: the weights are
    written on their 4-bit grid, in int8 or, with ``export_onnx(..., weights="int4")``, in int4). Raises a
    ValueError naming the first layer that does not map: other bit widths, an uncalibrated or disabled quantizer,
    a per-tensor activation range other than uint8 ``[0, 255]`` / int8 ``[-128, 127]``.
    """
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("qmodel has no QuantConv2d layers: quantize it first (run_ptq or quantize_model)")
    for name, layer in layers.items():
        w, a = layer.weight_quantizer.bits, layer.input_quantizer.bits
        if a != 8:
            raise ValueError(f"qmodel layer {name!r} is W{w}A{a}; ONNX export needs 8-bit activations (allowed: "
                             "W8A8, W4A8): ONNX Runtime's integer conv (QLinearConv) takes 8-bit inputs only, and "
                             "a graph with 4-bit (uint4) conv inputs fails to load in ONNX Runtime 1.32")
        if w not in (4, 8) or (w == 4 and not layer.weight_quantizer.symmetric):
            raise ValueError(f"qmodel layer {name!r} is W{w}A{a}{'' if w != 4 else ' with asymmetric weights'}; "
                             "ONNX export takes weights at 8 bits or at 4 bits symmetric (allowed: W8A8, W4A8)")
        for kind, q in (("weight", layer.weight_quantizer), ("input", layer.input_quantizer)):
            if not q.enabled or not bool(q.calibrated):
                raise ValueError(f"qmodel layer {name!r}: the {kind} quantizer is disabled or has no scale; "
                                 "export needs every quantizer enabled and calibrated")
            if (q.qmin, q.qmax) not in _RANGES and not (kind == "weight" and (q.qmin, q.qmax) == (-8, 7)):
                raise ValueError(f"qmodel layer {name!r}: {kind} range {q.qmin}..{q.qmax} has no ONNX form; "
                                 "allowed: 0..255 (uint8) or -128..127 (int8)")
            if q.axis not in (None, 0):
                raise ValueError(f"qmodel layer {name!r}: {kind} quantizer axis={q.axis}; allowed: None or 0")
    for name, q in deploy_quantizers(qmodel).items():
        if not q.enabled or not bool(q.calibrated):
            raise ValueError(f"qmodel deploy quantizer {name!r} is disabled or has no scale; calibrate them with "
                             "detptq_mini.quant.calibrate_deploy (run_ptq(..., deploy=True))")
    return layers


class _QDQConv(nn.Module):
    """A :class:`QuantConv2d` for export: the same conv, its quantizers as torch quantization ops."""

    def __init__(self, layer: QuantConv2d, dynamo: bool, fused: bool = False):
        super().__init__()
        self.conv, self.dynamo = layer.conv, dynamo
        wq = layer.weight_quantizer
        if wq.bits == 4:  # the weights on their 4-bit grid, then an int8 Q/DQ with the same scale: exact
            self.conv = copy.deepcopy(layer.conv).requires_grad_(False)
            with torch.no_grad():
                self.conv.weight.copy_(wq(layer.conv.weight))
        self.quantizers = []
        out = layer.output_quantizer if fused else None
        for kind, q in (("w", wq), ("a", layer.input_quantizer), ("o", out)):
            if q is None:
                continue
            self.register_buffer(f"{kind}_scale", q.scale.detach().clone().float())
            self.register_buffer(f"{kind}_zero_point", q.zero_point.detach().clone().to(torch.int32))
            qmin, qmax = (-128, 127) if (q is wq and q.bits == 4) else (q.qmin, q.qmax)
            self.quantizers.append((kind, q.axis, qmin, qmax))
        # per-tensor qparams as Python numbers for the dynamo path (torch.export cannot read a buffer's value)
        self.scalars = {"a": (float(layer.input_quantizer.scale), int(layer.input_quantizer.zero_point))}
        if out is not None:
            self.scalars["o"] = (float(out.scale), int(out.zero_point))
        if layer.weight_quantizer.axis is None:
            self.scalars["w"] = (float(layer.weight_quantizer.scale), int(layer.weight_quantizer.zero_point))

    def _qdq(self, x: Tensor, kind: str, axis: int | None, qmin: int, qmax: int) -> Tensor:
        s, z = getattr(self, f"{kind}_scale"), getattr(self, f"{kind}_zero_point")
        if self.dynamo:  # PT2E's ops: torch.export traces them, the exporter maps them to Q/DQ
            ops, dtype = torch.ops.quantized_decomposed, _RANGES[(qmin, qmax)]
            if axis is None:
                sf, zi = self.scalars[kind]
                return ops.dequantize_per_tensor(ops.quantize_per_tensor(x, sf, zi, qmin, qmax, dtype),
                                                 sf, zi, qmin, qmax, dtype)
            z = z.long()
            return ops.dequantize_per_channel(ops.quantize_per_channel(x, s, z, axis, qmin, qmax, dtype),
                                              s, z, axis, qmin, qmax, dtype)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, s, z, axis, qmin, qmax)

    def forward(self, x: Tensor) -> Tensor:
        (_, w_axis, w_min, w_max), (_, a_axis, a_min, a_max), *out = self.quantizers
        w = self._qdq(self.conv.weight, "w", w_axis, w_min, w_max)
        y = self.conv._conv_forward(self._qdq(x, "a", a_axis, a_min, a_max), w, self.conv.bias)
        return self._qdq(y, *out[0]) if out else y


class _QDQSiLU(_QDQConv):
    """A :class:`QuantSiLU` for export, ``x * QDQ(sigmoid(x))``: ONNX ``Sigmoid``, a Q/DQ pair, ``Mul``."""

    def __init__(self, act: QuantSiLU, dynamo: bool):
        nn.Module.__init__(self)
        q = act.gate_quantizer
        self.dynamo = dynamo
        self.register_buffer("g_scale", q.scale.detach().clone().float())
        self.register_buffer("g_zero_point", q.zero_point.detach().clone().to(torch.int32))
        self.gate = ("g", q.axis, q.qmin, q.qmax)
        self.scalars = {"g": (float(q.scale), int(q.zero_point))}

    def forward(self, x: Tensor) -> Tensor:
        return x * self._qdq(torch.sigmoid(x), *self.gate)


def _graph_of(qmodel: nn.Module, graph: str | None, argument: str = "graph") -> str:
    """``graph`` checked against :data:`GRAPHS`; ``None``: ``"fused"`` when ``qmodel`` has deploy quantizers."""
    has = bool(deploy_quantizers(qmodel))
    if graph is None:
        return "fused" if has else "qdq"
    if graph not in GRAPHS:
        raise ValueError(f"{shown(argument, graph)} is not a graph; allowed: {', '.join(map(repr, GRAPHS))}")
    if graph == "fused" and not has:
        raise ValueError(f"{shown(argument, graph)} needs the deploy quantizers (each conv's output, each SiLU's "
                         "sigmoid), and this model has none: quantize with deploy=True (command line: quantize "
                         "--w-bits 8 --a-bits 8 --deploy --out PATH), or write graph='qdq'")
    return graph


def to_qdq(qmodel: nn.Module, dynamo: bool = False, graph: str | None = None) -> nn.Module:
    """An export copy of the W8A8 ``qmodel``: every :class:`~detptq_mini.quant.QuantConv2d` computes with torch's
    quantization ops.

    ``graph`` (one of :data:`GRAPHS`; default ``"fused"`` when ``qmodel`` has deploy quantizers, else ``"qdq"``):
    ``"fused"`` keeps the deploy quantizers (each conv's output, each :class:`~detptq_mini.quant.QuantSiLU`'s
    sigmoid), so the copy's forward equals ``qmodel``'s bit for bit; ``"qdq"`` leaves them out (conv inputs and
    weights only), so it equals ``qmodel`` with its deploy quantizers off. The copy is in eval mode with gradients
    off. ``qmodel`` is not modified. ``dynamo`` selects the ops its exporter understands (see the module docstring).
    """
    check_bool("dynamo", dynamo)
    if dynamo:
        import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed
    names = list(check_exportable(qmodel))
    fused = _graph_of(qmodel, graph) == "fused"
    out = copy.deepcopy(qmodel).eval().requires_grad_(False)
    acts = [n for n, m in out.named_modules() if isinstance(m, QuantSiLU)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, leaf, _QDQConv(getattr(holder, leaf), dynamo, fused))
    for name in acts:
        parent, _, leaf = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, leaf, _QDQSiLU(getattr(holder, leaf), dynamo) if fused else nn.SiLU())
    return out


def to_float(qmodel: nn.Module) -> nn.Module:
    """The FP32 twin of a quantized model: each :class:`~detptq_mini.quant.QuantConv2d` replaced by its (BN-folded)
    float conv.

    The baseline of :func:`latency_per_image`: the same graph as the QDQ export, without the Q/DQ pairs.
    """
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("qmodel has no QuantConv2d layers: it is already a float model")
    out = copy.deepcopy(qmodel).eval()
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, leaf, getattr(holder, leaf).conv)
    for name in [n for n, m in out.named_modules() if isinstance(m, QuantSiLU)]:  # the deploy quantizers' SiLUs
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, nn.SiLU())
    return out


def _atomic_target(path, argument: str) -> tuple[Path, Path]:
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{shown(argument, str(path))}: directory {str(path.parent)!r} does not exist")
    if path.suffix != ".onnx":
        raise ValueError(f"{shown(argument, str(path))} must end in .onnx")
    return path, path.with_name(f".{path.stem}.tmp{os.getpid()}.onnx")


def export_onnx(model: nn.Module, path, image_size: int = 128, dynamo: bool = False, opset: int | None = None,
                argument: str = "path", graph: str | None = None, weights: str = "int8") -> Path:
    """Write ``model`` to ``path`` as ONNX (atomically): a QDQ graph for a W8A8 quantized model, else FP32.

    A quantized model with deploy quantizers (``run_ptq(..., deploy=True)``) is written as the **fused** graph
    by default: Q/DQ pairs also on every conv's output and every SiLU's sigmoid, where ONNX Runtime's QDQ fusions
    expect them, so that it runs every conv as ``QLinearConv`` (and the sigmoids and many SiLU products as
    ``QLinearSigmoid``/``QLinearMul``); ``graph="qdq"`` writes the first export (conv inputs and weights only).
    In every graph each quantized conv's weight is an int8 initializer of the torch model's codes, read by its
    ``DequantizeLinear`` (no float weight, no ``QuantizeLinear`` on it; see the module docstring).

    Input ``images`` ``(batch, 3, image_size, image_size)`` float32 with a dynamic batch; outputs
    :data:`OUTPUT_NAMES` (the dense head outputs, levels in order).

    Args:
        model: a quantized detector (exported through :func:`to_qdq`) or an FP detector (exported as it is).
        path: the ``.onnx`` file; its directory must exist. Nothing is left behind on failure.
        image_size: height and width of the example input (a multiple of 32).
        dynamo: use the ``torch.export`` based exporter (needs onnxscript) instead of the TorchScript one.
        opset: ONNX opset (default :data:`OPSET`; 18 with ``dynamo``); at least 13.
        argument: the name ``path`` has in error messages (the CLI passes ``--onnx``).
        graph: a quantized model's graph, one of :data:`GRAPHS` (see :func:`to_qdq`); ignored for an FP model.
        weights: how 4-bit weights (a W4A8 model) are stored, one of :data:`WEIGHTS`: ``"int8"`` (their 4-bit
            codes in int8) or ``"int4"`` (ONNX int4, opset :data:`INT4_OPSET`: the graph is exported at
            ``opset`` and converted; TorchScript exporter only). 8-bit weights are int8 codes either way.
    """
    path, tmp = _atomic_target(path, argument)
    image_size = check_int("image_size", image_size, 32, hint="and a multiple of 32")
    if image_size % 32:
        raise ValueError(f"image_size={image_size!r} must be a multiple of 32")
    check_bool("dynamo", dynamo)
    opset = (18 if dynamo else OPSET) if opset is None else opset
    opset = check_int("opset", opset, 13, hint="(per-channel QuantizeLinear)")
    check_choice("weights", weights, WEIGHTS)
    layers = quant_layers(model)
    if weights == "int4":
        if dynamo:
            raise ValueError("weights='int4' needs the TorchScript exporter (dynamo=False)")
        if not any(m.weight_quantizer.bits == 4 for m in layers.values()):
            raise ValueError("weights='int4' needs a model with 4-bit weights (W4A8); this one has none "
                             "(allowed for it: weights='int8')")
    if layers:
        model = to_qdq(model, dynamo, graph)
    else:
        model = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = torch.zeros(2, 3, image_size, image_size, device=device)  # batch 2: torch.export specializes 1
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' tracer and deprecation notes; errors still raise
            if dynamo:
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset, verbose=False,
                                  input_names=["images"], output_names=list(OUTPUT_NAMES),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},), external_data=False)
            else:
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["images"], output_names=list(OUTPUT_NAMES), dynamic_axes=axes)
        if layers:
            _rewrite_weights(tmp, layers, weights == "int4")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _weight_codes(layer: QuantConv2d) -> Tensor:
    """The integer codes of ``layer``'s weights as its weight quantizer computes them (the reciprocal multiply
    and round half to even of :func:`~detptq_mini.quant.fake_quantize`): ``clamp(round(W * (1/s)) + z, qmin,
    qmax)``, per output channel for a per-channel quantizer; float32, integer-valued, the weight's shape."""
    q, w = layer.weight_quantizer, layer.conv.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1) if q.axis == 0 else ()
    s, z = q.scale.detach().reshape(shape).to(w), q.zero_point.detach().reshape(shape).to(w)
    return torch.mul(w, 1.0 / s).round_().add_(z).clamp_(q.qmin, q.qmax)


def _integer_weights(m, layers: dict[str, QuantConv2d], int4: bool = False) -> None:
    """Store the conv weights of the ONNX model ``m`` (a ``ModelProto``, rewritten in place) as integer codes.

    ``layers`` maps the name of a float weight initializer to its :class:`QuantConv2d`. Each such weight is read
    through ``QuantizeLinear -> DequantizeLinear`` in the exported graph (the dynamo exporter adds a ``Clip``
    between them); it becomes an integer initializer of the torch model's own codes (:func:`_weight_codes`),
    read directly by the ``DequantizeLinear`` with the same scales and zero points, and the ``QuantizeLinear``
    (with its ``Clip``) and the float initializer are removed: a quarter of the bytes, the same function. The
    codes are int8 (uint8 for an asymmetric 8-bit weight, as its zero point is); with ``int4``, a
    4-bit weight's codes are ONNX int4, its zero point omitted (0, symmetric; the caller converts the model to
    :data:`INT4_OPSET`). Raises a ValueError for a layer whose weight has no such path in the graph, or whose
    float initializer is not the weight the torch model quantizes.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    done, dropped = set(), []
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        dq = producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        chain, q = [], producer.get(dq.input[0])
        while q is not None and q.op_type in ("Clip", "Identity"):
            chain.append(q)
            q = producer.get(q.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in layers or q.input[0] not in inits:
            continue
        name, layer = q.input[0], layers[q.input[0]]
        wq = layer.weight_quantizer
        w = numpy_helper.to_array(inits[name])
        expected = layer.conv.weight if wq.bits == 8 else wq(layer.conv.weight)  # 4-bit: exported on its grid
        if w.shape != tuple(expected.shape) or not np.array_equal(w, expected.detach().cpu().numpy()):
            raise ValueError(f"weight {name!r}: the exported initializer is not the weight the torch model "
                             "quantizes")
        codes = _weight_codes(layer).cpu().numpy()
        if int4 and wq.bits == 4:
            nibbles = codes.astype(np.int8).ravel().view(np.uint8) & 0x0F
            nibbles = np.pad(nibbles, (0, nibbles.size % 2))  # raw int4: two a byte, the first in the low half
            init = helper.make_tensor(f"{name}_int4", TensorProto.INT4, list(w.shape),
                                      (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes(), raw=True)
            inputs = [init.name, dq.input[1]]  # zero point omitted: 0, symmetric
        else:
            dtype = np.uint8 if (wq.qmin, wq.qmax) == (0, 255) else np.int8  # as the graph's zero point
            init = numpy_helper.from_array(codes.astype(dtype), f"{name}_int8")
            inputs = [init.name, *dq.input[1:]]
        g.initializer.append(init)
        readers[dq.input[0]] -= 1
        del dq.input[:]
        dq.input.extend(inputs)
        for n in chain + [q]:  # from the DequantizeLinear up: a node goes once nothing else reads it
            if readers[n.output[0]] > 0:
                break
            dropped.append(n)
            for i in n.input:
                readers[i] -= 1
        done.add(name)
    missing = sorted(set(layers) - done)
    if missing:
        raise ValueError(f"weights {missing} have no QuantizeLinear -> DequantizeLinear path in the exported graph")
    for n in dropped:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)


def _rewrite_weights(path: Path, layers: dict[str, QuantConv2d], int4: bool) -> None:
    """:func:`_integer_weights` on the graph at ``path``, in place; with ``int4``, first converted to opset
    :data:`INT4_OPSET` (IR version 10: int4 tensors)."""
    import onnx
    from onnx import version_converter

    m = onnx.load(str(path))
    if int4:
        m = version_converter.convert_version(m, INT4_OPSET)
        m.ir_version = max(m.ir_version, 10)
    _integer_weights(m, {f"{n}.conv.weight": layer for n, layer in layers.items()}, int4)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def qdq_summary(path) -> dict:
    """What an exported graph holds: node counts and how many convs sit between Q/DQ pairs.

    A conv counts as quantized when its input comes from a ``DequantizeLinear`` fed by a ``QuantizeLinear``,
    and its weight from a ``DequantizeLinear`` (of a ``QuantizeLinear`` or of an int8 initializer); its weight
    is per channel when that ``DequantizeLinear``'s scale has one entry per output channel along axis 0.

    Returns:
        ``{"opset", "nodes": {op type: count}, "convs", "qdq_convs", "per_channel_weight_convs"}``.
    """
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def shape_of(name: str) -> tuple[int, ...] | None:
        if name in inits:
            return tuple(inits[name].dims)
        if name in consts:
            return tuple(numpy_helper.to_array(consts[name].attribute[0].t).shape)
        return None

    def from_op(name: str, op: str):
        n = producer.get(name)
        while n is not None and n.op_type == "Identity":  # the exporters sometimes alias initializers
            n = producer.get(n.input[0])
        return n if n is not None and n.op_type == op else None

    counts: dict[str, int] = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    convs = [n for n in g.node if n.op_type == "Conv"]
    def weight_source(name: str) -> str | None:
        """The tensor a weight DequantizeLinear dequantizes back to: a QuantizeLinear's float input, or an
        integer initializer (possibly through Identity/Clip, as the dynamo exporter writes it)."""
        n = producer.get(name)
        while n is not None and n.op_type in ("Identity", "Clip"):
            name, n = n.input[0], producer.get(n.input[0])
        if n is None:
            return name if name in inits or name in consts else None
        return n.input[0] if n.op_type == "QuantizeLinear" else None

    qdq = per_channel = 0
    for conv in convs:
        dq_x, dq_w = from_op(conv.input[0], "DequantizeLinear"), from_op(conv.input[1], "DequantizeLinear")
        if dq_x is None or dq_w is None or from_op(dq_x.input[0], "QuantizeLinear") is None:
            continue
        source = weight_source(dq_w.input[0])
        if source is None:
            continue
        qdq += 1
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        w_shape, s_shape = shape_of(source), shape_of(dq_w.input[1])
        if axis == 0 and w_shape is not None and s_shape == (w_shape[0],):
            per_channel += 1
    opset = next((o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "nodes": counts, "convs": len(convs), "qdq_convs": qdq,
            "per_channel_weight_convs": per_channel}


def onnx_session(path, threads: int = 1):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    threads = check_int("threads", threads, 1)
    if not Path(path).is_file():
        raise ValueError(f"onnx={str(path)!r} does not exist")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxDetector(nn.Module):
    """An ONNX Runtime session behind the detector's interface: ``forward(images) -> DenseOutputs`` (CPU).

    So :func:`detptq_mini.evaluate.evaluate_model` (decode and NMS in torch) measures the exported graph's mAP.
    """

    def __init__(self, session):
        super().__init__()
        self.session = session
        names = [o.name for o in session.get_outputs()]
        if names != list(OUTPUT_NAMES):
            raise ValueError(f"session outputs are {names}; an exported detector has {list(OUTPUT_NAMES)}")

    def forward(self, x: Tensor) -> DenseOutputs:
        outs = self.session.run(None, {"images": x.detach().cpu().float().contiguous().numpy()})
        t = [torch.from_numpy(o) for o in outs]
        return DenseOutputs(tuple(t[:3]), tuple(t[3:]))


@torch.no_grad()
def compare_outputs(qmodel: nn.Module, session, images: Tensor, batch_size: int = 32) -> dict:
    """ONNX Runtime's outputs against the fake-quant model's, per output, in units of a quantization step.

    For output ``o`` (a prediction conv's output, channel ``c``) the step is ``s_a * sum_k |W_q[c, k]|``: how
    far the output moves when every input value of that conv moves by one integer code (``s_a``, the conv's
    input scale) in the worst direction. Returned per output name: ``max_abs`` and ``mean_abs`` of
    ``|ORT - fake quant|``, ``step`` (the smallest step over the channels), ``max_steps`` (the largest
    ``|ORT - fake quant| / step_c``). Through the whole network these are not bounded by one step: a value
    that ORT rounds to the neighbouring code moves the next layers' inputs, which may cross further rounding
    boundaries. :func:`check_layers` checks each conv on its own; the mAP checks the whole.

    A prediction conv left in FP (the layer protocol ``"head-fp"``) has no quantization step: its output's
    ``step`` and ``max_steps`` are None (``max_abs`` and ``mean_abs`` are measured as for the others).
    """

    images = check_images(images, "images")
    layers = check_exportable(qmodel)
    ort_model = OnnxDetector(session)
    # quantized (QuantConv2d) or, with protocol "head-fp", plain FP convs; a QuantConv2d's own conv ends in ".conv"
    preds = [n for n, m in qmodel.named_modules() if n.endswith(".pred") and isinstance(m, (QuantConv2d, nn.Conv2d))]
    if len(preds) != len(OUTPUT_NAMES):
        raise ValueError(f"qmodel has {len(preds)} prediction convs (*.pred); the detector has {len(OUTPUT_NAMES)}")
    # the detector's prediction convs in output order: cls of each level, then box of each level
    order = [n for n in preds if ".cls." in n] + [n for n in preds if ".box." in n]
    steps = [_step(layers[n]) if n in layers else None for n in order]
    stats = {n: {"max_abs": 0.0, "sum_abs": 0.0, "count": 0, "max_steps": 0.0} for n in OUTPUT_NAMES}
    with eval_mode(qmodel):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            ref, got = qmodel(x.to(next(qmodel.parameters()).device)), ort_model(x)
            for name, r, o, st in zip(OUTPUT_NAMES, ref.cls + ref.box, got.cls + got.box, steps):
                d = (r.float().cpu() - o).abs()
                s = stats[name]
                s["max_abs"] = max(s["max_abs"], float(d.max()))
                s["sum_abs"] += float(d.sum())
                s["count"] += d.numel()
                if st is not None:
                    s["max_steps"] = max(s["max_steps"], float((d / st.cpu()).max()))
    out = {}
    for name, st in zip(OUTPUT_NAMES, steps):
        s = stats[name]
        out[name] = {"max_abs": s["max_abs"], "mean_abs": s["sum_abs"] / s["count"],
                     "step": None if st is None else float(st.min()),
                     "max_steps": None if st is None else s["max_steps"]}
    return out


def _step(layer: QuantConv2d) -> Tensor:
    """``s_a * sum_k |W_q[c, k]|`` per output channel, shape ``(1, C_out, 1, 1)``; for a conv whose output is
    quantized too (a deploy quantizer, scale ``s_o``), at least ``s_o``: its output moves by whole codes."""
    w = layer.weight_quantizer(layer.conv.weight.detach()).abs().flatten(1).sum(1)
    step = layer.input_quantizer.scale * w
    out = layer.output_quantizer
    if out is not None and out.enabled:
        step = torch.maximum(step, out.scale.expand_as(step))
    return step.view(1, -1, 1, 1).float()


@torch.no_grad()
def check_layers(qmodel: nn.Module, images: Tensor, threads: int = 1) -> dict:
    """Every conv as ONNX Runtime runs it, against the fake-quant conv, on the same input: within one step?

    Each :class:`~detptq_mini.quant.QuantConv2d` is exported on its own (the same Q/DQ pair on its input, and the
    same int8 weight codes, as in the full graph) and run by ONNX Runtime on the very input the fake-quant model gives
    that conv on ``images``. The difference, per output channel ``c``, is measured in steps ``s_a * sum_k |W_q[c, k]|``
    (every input of the output one integer code away): float accumulation order aside, a conv that rounds
    as the fake-quant conv does stays far below one step.

    Returns:
        ``{"layers": {name: max_steps}, "max_steps", "worst_layer", "within_step"}`` (``max_steps <= 1``).
    """
    import io

    import onnx
    import onnxruntime as ort

    images = check_images(images, "images")
    layers = check_exportable(qmodel)
    inputs: dict[str, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
               for n, m in layers.items()]
    try:
        with eval_mode(qmodel):
            qmodel(images.to(next(qmodel.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    result = {}
    for name, layer in layers.items():
        x = inputs[name].float().contiguous()
        ref = layer(x)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = layer.output_quantizer is not None and layer.output_quantizer.enabled
            torch.onnx.export(_QDQConv(layer, False, fused).eval().requires_grad_(False), (x[:1],), buf,
                              dynamo=False, opset_version=OPSET, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        m = onnx.load_from_string(buf.getvalue())
        _integer_weights(m, {"conv.weight": layer})  # its weight as the full graph stores it: int8 codes
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"x": x.cpu().numpy()})[0])
        result[name] = float(((ref.cpu() - got).abs() / _step(layer).cpu()).max())
    worst = max(result, key=result.get)
    return {"layers": result, "max_steps": result[worst], "worst_layer": worst, "within_step": result[worst] <= 1.0}


def latency_per_image(session, image_size: int = 128, warmup: int = 10, repeats: int = 50, batch: int = 1,
                      seed: int = 0) -> dict:
    """Wall-clock latency of ``session`` per image: median (and min, max) over ``repeats`` timed runs.

    Each run is one batch of ``batch`` random images (seeded); ``warmup`` untimed runs come first.
    Returns ``{"median_ms", "min_ms", "max_ms", "batch", "repeats"}``, per image.
    """
    warmup, repeats = check_int("warmup", warmup, 0), check_int("repeats", repeats, 1)
    batch = check_int("batch", batch, 1)
    g = torch.Generator().manual_seed(seed)
    feed = {"images": torch.rand(batch, 3, image_size, image_size, generator=g).numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000 / batch)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "batch": batch,
            "repeats": repeats}
