"""What a deployment runtime makes of an exported graph: ONNX Runtime's optimized graph, its peer, and timing.

:mod:`detptq_mini.export` writes a graph; this module answers the deployment questions about it, in ONNX
Runtime on CPU (method page, section 7):

* **Does every conv run as an integer kernel?** :func:`optimized_graph` lets ONNX Runtime optimize a graph as it
  does before running it (``optimized_model_filepath``) and counts the kernels: ``QLinearConv`` and
  ``ConvInteger`` are integer convs, ``Conv``/``FusedConv``/``NhwcFusedConv`` float ones.
* **What would a practitioner get instead?** :func:`ort_quantize_static` is ONNX Runtime's own post-training
  quantization of the same FP32 graph (``quantize_static``: QDQ, per-channel int8 weights, uint8 activations,
  min-max ranges on the same calibration images), the peer the fused export is measured against.
* **How fast?** :func:`latency_table` times several sessions *interleaved* (round after round, each session
  once per round), so that a load that comes and goes on the machine hits them alike and their ratios stay
  meaningful, and :func:`compare_graphs` puts mAP, integer-kernel counts and latency of every graph in one dict
  (``detptq-mini export --benchmark`` and ``benchmarks/onnx_latency.py``).

Why the fused export writes its own Q/DQ pairs rather than running ``quantize_static`` with our scales pinned
(its ``TensorQuantOverrides``), measured on the shipped detector (W8A8 min-max, one thread, batch 1, interleaved):
``quantize_static`` puts one Q/DQ pair per *tensor*, so a tensor read by several convs (the neck outputs feed the
next neck unit and both head branches; each half of a C2f split feeds a conv and the concat) would get one scale
for all its readers, not each conv's own input scale; and every other tensor (the adds, the concatenations) would
need a quantizer in the torch twin placed exactly as that tool places it. Writing the pairs from the twin itself
makes the graph equal the twin by construction and keeps every conv's input scale; the cost is speed on the
tensors left in float (the adds, concatenations and SiLU products read by several convs): 0.67x the FP32 graph's
time against the peer's 0.64x (1.05x the peer), where the first export took 1.6x (provisional figures: the
machine was under load while they were taken; benchmarks/onnx_latency.py re-measures them).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_choice, check_images, check_int
from .data import ShapesDataset
from .evaluate import evaluate_model
from .export import OnnxDetector, check_exportable, export_onnx, onnx_session, to_float
from .quant import deploy_quantizers, eval_mode

__all__ = ["INTEGER_CONVS", "FLOAT_CONVS", "GRAPH_NAMES", "optimized_graph", "ort_quantize_static", "latency_table",
           "compare_graphs", "CONV_TYPES", "conv_kernel"]

#: The op types that are integer convs in the graph ONNX Runtime runs (:func:`optimized_graph` counts them).
INTEGER_CONVS: tuple[str, ...] = ("QLinearConv", "ConvInteger")
#: The op types that are float convs there (ONNX Runtime's fused convs included).
FLOAT_CONVS: tuple[str, ...] = ("Conv", "FusedConv", "NhwcFusedConv")


def optimized_graph(path, threads: int = 1) -> dict:
    """The graph ONNX Runtime runs for ``path`` (CPU, all optimizations), by kernel.

    Returns ``{"nodes": {op type: count}, "integer_convs", "float_convs"}`` (:data:`INTEGER_CONVS`,
    :data:`FLOAT_CONVS`), counted in the optimized model ONNX Runtime saves (``optimized_model_filepath``).
    """
    import onnx
    import onnxruntime as ort

    threads = check_int("threads", threads, 1)
    if not Path(path).is_file():
        raise ValueError(f"onnx={str(path)!r} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes: dict[str, int] = {}
        for n in onnx.load(so.optimized_model_filepath).graph.node:
            nodes[n.op_type] = nodes.get(n.op_type, 0) + 1
    return {"nodes": nodes, "integer_convs": sum(nodes.get(k, 0) for k in INTEGER_CONVS),
            "float_convs": sum(nodes.get(k, 0) for k in FLOAT_CONVS)}


def ort_quantize_static(fp_path, path, calib: Tensor) -> Path:
    """ONNX Runtime's own static quantization of the FP32 graph ``fp_path``, written to ``path`` (atomically).

    The settings a practitioner would pick for a CPU: QDQ format, per-channel symmetric int8 weights, uint8
    activations, min-max ranges over ``calib`` (``(N, 3, H, W)`` images in [0, 1], one per calibration step),
    after ONNX Runtime's own pre-processing (shape inference; the symbolic pass is skipped, the dynamic batch
    defeats it).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = check_images(calib, "calib")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path={str(path)!r}: directory {str(path.parent)!r} does not exist")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calib[i:i + 1].cpu().numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(fp_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        tmp_target = path.with_name(f".{path.stem}.tmp{os.getpid()}.onnx")
        try:  # a copy beside the target, then a rename: atomic even when tmp is on another file system
            shutil.copyfile(out, tmp_target)
            os.replace(tmp_target, path)
        finally:
            tmp_target.unlink(missing_ok=True)
    return path


def latency_table(sessions: dict, batches=(1, 16), rounds: int = 5, warmup: int = 5, repeats: int = 20,
                  image_size: int = 128, seed: int = 0) -> dict:
    """Latency per image of every session at every batch size, timed interleaved.

    For each batch size: ``rounds`` rounds, each running every session (in order) for ``warmup`` untimed and
    ``repeats`` timed runs of one batch of ``batch`` seeded random images; a session's latency is the median of
    its round medians. Returns ``{batch: {name: {"median_ms", "rounds_ms"}}}`` in ms per image.
    """
    rounds, warmup, repeats = check_int("rounds", rounds, 1), check_int("warmup", warmup, 0), check_int(
        "repeats", repeats, 1)
    if not sessions:
        raise ValueError("sessions is empty: pass at least one {name: session}")
    out = {}
    for b in batches:
        b = check_int("batch", b, 1)
        g = torch.Generator().manual_seed(seed)
        feed = {"images": torch.rand(b, 3, image_size, image_size, generator=g).numpy()}
        per = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, sess in sessions.items():
                for _ in range(warmup):
                    sess.run(None, feed)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times.append((time.perf_counter() - t0) * 1000 / b)
                per[name].append(statistics.median(times))
        out[b] = {name: {"median_ms": float(np.median(v)), "rounds_ms": v} for name, v in per.items()}
    return out


#: The ONNX integer types :func:`conv_kernel` tries, for a conv's weight and for its input and output.
CONV_TYPES: dict[str, tuple[str, ...]] = {"weight": ("int8", "int4"), "act": ("uint8", "uint4")}


def conv_kernel(weight: str = "int8", act: str = "uint8") -> dict:
    """Which kernel ONNX Runtime (CPU) runs for one QDQ conv with ``weight`` and ``act`` integer types.

    Builds the smallest graph of the fused form, ``Q -> DQ -> Conv -> Q -> DQ`` on the input and output (type
    ``act``, one of ``CONV_TYPES["act"]``) with a per-channel ``DQ`` weight initializer (type ``weight``, one of
    ``CONV_TYPES["weight"]``), at opset 21 (the first with 4-bit types), and lets ONNX Runtime optimize it.

    Returns:
        ``{"weight", "act", "loads": bool, "kernel": "QLinearConv" | "Conv" | ... | None, "error": str | None}``:
        the conv's kernel in the optimized graph, or the load error (its first line) when the graph does not load.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    check_choice("weight", weight, CONV_TYPES["weight"])
    check_choice("act", act, CONV_TYPES["act"])
    wt = {"int8": TensorProto.INT8, "int4": TensorProto.INT4}[weight]
    at, z = {"uint8": (TensorProto.UINT8, 128), "uint4": (TensorProto.UINT4, 8)}[act]
    codes = np.random.default_rng(0).integers(-8, 8, size=(4, 8, 3, 3))
    inits = [helper.make_tensor("w", wt, list(codes.shape), codes.ravel().tolist()),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.float32(0.1), "s"), helper.make_tensor("z", at, [], [z])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_s"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    out = {"weight": weight, "act": act, "loads": True, "kernel": None, "error": None}
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 4
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            sess.run(None, {"x": np.zeros((1, 8, 8, 8), np.float32)})
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own exception types; the message is the answer
            out.update(loads=False, error=str(e).strip().splitlines()[0])
            return out
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    out["kernel"] = next((op for op in ops if op in INTEGER_CONVS + FLOAT_CONVS), None)
    return out


#: The graphs :func:`compare_graphs` runs, in its order.
GRAPH_NAMES: tuple[str, ...] = ("fp32", "fused", "qdq", "ort_quantize_static")


def compare_graphs(qmodel: nn.Module, calib: Tensor, val: ShapesDataset, fused_path=None, threads: int = 1,
                   batches=(1, 16), rounds: int = 5, warmup: int = 5, repeats: int = 20) -> dict:
    """Every graph of one W8A8 model side by side in ONNX Runtime (CPU), in one run.

    The graphs (:data:`GRAPH_NAMES`): ``fp32`` (:func:`~detptq_mini.export.to_float`), ``fused`` (the default
    export: ``fused_path`` if given, else exported here), ``qdq`` (the first export, conv inputs and weights
    only) and ``ort_quantize_static`` (:func:`ort_quantize_static` of the FP32 graph on ``calib``).

    Args:
        qmodel: a W8A8 model with calibrated deploy quantizers (``run_ptq(..., deploy=True)``).
        calib: the calibration images of the peer (those ``qmodel`` was calibrated on, for a fair comparison).
        val: the images whose mAP is measured (also that of the fake-quant model, the fused graph's torch twin).
        fused_path: an already exported fused graph of ``qmodel``.
        threads, batches, rounds, warmup, repeats: ONNX Runtime threads and :func:`latency_table`'s settings.

    Returns:
        a dict: ``map`` (mAP of ``fake_quant`` and of every graph), ``map_diff_fused_vs_fake_quant``, ``convs``,
        ``integer_convs`` and ``float_convs`` (per graph), ``all_convs_integer``, ``optimized_nodes`` (per graph,
        op -> count), ``latency_ms`` (per batch key ``b1``, ``b16``, ...: per graph, ms per image),
        ``ratio_to_fp32`` (the same keys), ``ratio_fused_to_peer`` (per batch key), ``threads``, ``rounds``,
        ``repeats``.
    """
    layers = check_exportable(qmodel)
    if not deploy_quantizers(qmodel):
        raise ValueError("qmodel has no deploy quantizers, so it has no fused graph to compare: quantize with "
                         "deploy=True (command line: quantize --w-bits 8 --a-bits 8 --deploy --out PATH)")
    calib = check_images(calib, "calib")
    threads = check_int("threads", threads, 1)
    qmodel = qmodel.cpu()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": export_onnx(to_float(qmodel), Path(tmp) / "fp32.onnx"),
                 "fused": Path(fused_path) if fused_path is not None else export_onnx(qmodel, Path(tmp) / "f.onnx"),
                 "qdq": export_onnx(qmodel, Path(tmp) / "qdq.onnx", graph="qdq")}
        paths["ort_quantize_static"] = ort_quantize_static(paths["fp32"], Path(tmp) / "peer.onnx", calib)
        sessions = {name: onnx_session(paths[name], threads) for name in GRAPH_NAMES}
        graphs = {name: optimized_graph(paths[name], threads) for name in GRAPH_NAMES}
        with eval_mode(qmodel):
            maps = {"fake_quant": evaluate_model(qmodel, val)["map"]}
        for name in GRAPH_NAMES:
            maps[name] = evaluate_model(OnnxDetector(sessions[name]), val)["map"]
        lat = latency_table(sessions, batches, rounds, warmup, repeats)
    latency = {f"b{b}": {n: v["median_ms"] for n, v in t.items()} for b, t in lat.items()}
    return {
        "map": maps, "map_diff_fused_vs_fake_quant": maps["fused"] - maps["fake_quant"], "val_images": len(val),
        "convs": len(layers), "integer_convs": {n: g["integer_convs"] for n, g in graphs.items()},
        "float_convs": {n: g["float_convs"] for n, g in graphs.items()},
        "all_convs_integer": graphs["fused"]["integer_convs"] == len(layers) and graphs["fused"]["float_convs"] == 0,
        "optimized_nodes": {n: g["nodes"] for n, g in graphs.items()}, "latency_ms": latency,
        "ratio_to_fp32": {b: {n: v / t["fp32"] for n, v in t.items()} for b, t in latency.items()},
        "ratio_fused_to_peer": {b: t["fused"] / t["ort_quantize_static"] for b, t in latency.items()},
        "threads": threads, "rounds": rounds, "repeats": repeats,
    }
