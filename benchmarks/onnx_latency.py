"""ONNX Runtime on CPU: every graph of a W8A8 model side by side in one run, for min-max and for DetPTQ.

For each method (``--methods``, default min-max and DetPTQ), quantizes the shipped detector W8A8 on 256
calibration images (seed 0) with the deploy quantizers (``run_ptq(..., deploy=True)``: their p chosen by ODOL), then
:func:`detptq_mini.deploy.compare_graphs` measures, in ONNX Runtime with ``--threads`` threads:

* mAP50:95 on the 500 val images of the fake-quant model (the fused graph's torch twin), the fused graph, the
  first export (Q/DQ on conv inputs and weights only), ONNX Runtime's own ``quantize_static`` (min-max) of the
  same FP32 graph on the same calibration images, and the FP32 graph;
* how many convs run as integer kernels in ONNX Runtime's optimized graph, for each graph;
* latency per image at batch 1 and ``--batch``, every graph timed interleaved (rounds of each graph in turn),
  and the ratios to FP32 and to the peer.

The JSON (``--json``, default ``benchmarks/results/onnx_latency.json``, written atomically) is what the
deployment chapter reads. Timings depend on the machine and on its load: compare ratios, not milliseconds.

``--w4a8`` measures 4-bit weights instead (W4A8, the deploy quantizers calibrated as above; default JSON
``benchmarks/results/onnx_latency_w4a8.json``): the fused graph with the 4-bit weights stored in int8
(``export_onnx(..., weights="int8")``) and in ONNX's int4 type (``weights="int4"``, opset 21), against FP32 and
ONNX Runtime's ``quantize_static`` (W8A8) of the same FP32 graph: mAP, integer convs of ONNX Runtime's optimized
graph, file size, latency interleaved.

Usage (from the repository root; ``OMP_NUM_THREADS=1`` keeps torch off the timed cores):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_latency.py [--threads 1] [--rounds 5] [--repeats 20]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_latency.py --w4a8
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.deploy import GRAPH_NAMES, compare_graphs, latency_table, optimized_graph, ort_quantize_static
from detptq_mini.evaluate import evaluate_model
from detptq_mini.export import OnnxDetector, export_onnx, onnx_session, to_float
from detptq_mini.quant import eval_mode, quant_layers
from detptq_mini.pipeline import run_ptq
from detptq_mini.utils import atomic_write_json, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["minmax", "detptq"], choices=["minmax", "lp", "detptq"])
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per graph per round")
    ap.add_argument("--batch", type=int, default=16, help="the second batch size timed (per image)")
    ap.add_argument("--w4a8", action="store_true", help="4-bit weights: int8 and int4 storage (see above)")
    ap.add_argument("--json", default=None, help="the result file ('': none; default benchmarks/results/"
                    "onnx_latency.json, with --w4a8 onnx_latency_w4a8.json)")
    args = ap.parse_args()
    if args.json is None:
        args.json = f"benchmarks/results/onnx_latency{'_w4a8' if args.w4a8 else ''}.json"
    seed_everything(0)
    torch.set_num_threads(1)

    fp_model = load_pretrained()
    calib = ShapesDataset("calib", args.calib, seed=0).images()
    val = ShapesDataset("val", args.val, seed=0)
    res = {"onnxruntime": ort.__version__, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": args.threads, "calib_images": args.calib,
           "val_images": args.val, "batches": [1, args.batch], "graphs": list(GRAPH_NAMES),
           "fp32_torch_map": evaluate_model(fp_model, val)["map"], "methods": {}}
    if args.w4a8:
        res["graphs"] = list(W4A8_GRAPHS)
    for method in args.methods:
        if args.w4a8:
            res["methods"][method] = w4a8(fp_model, calib, val, method, args)
            if args.json:
                atomic_write_json(args.json, res)
            continue
        t0 = time.perf_counter()
        result = run_ptq(fp_model, calib, method, 8, 8, deploy=True)
        qmodel = result.model
        seconds = time.perf_counter() - t0
        r = compare_graphs(qmodel, calib, val, threads=args.threads, batches=(1, args.batch), rounds=args.rounds,
                           warmup=args.warmup, repeats=args.repeats)
        res["methods"][method] = {"quantize_seconds": seconds, "deploy": result.report["deploy"], **r}
        if args.json:  # rewritten after every method, so that a long run keeps what it has measured
            atomic_write_json(args.json, res)
        print(f"\n{method} W8A8 (deploy quantizers), {args.val} val images, {args.threads} thread(s)")
        print(f"  integer convs in ORT's optimized graph: " +
              ", ".join(f"{g} {r['integer_convs'][g]}/{r['convs']}" for g in GRAPH_NAMES))
        print(f"  mAP50:95: fake quant {r['map']['fake_quant']:.4f}, " +
              ", ".join(f"{g} {r['map'][g]:.4f}" for g in GRAPH_NAMES))
        for b, t in r["latency_ms"].items():
            print(f"  {b}: " + ", ".join(f"{g} {t[g]:.3f} ms ({r['ratio_to_fp32'][b][g]:.2f}x FP32)" for g in GRAPH_NAMES)
                  + f"; fused / peer {r['ratio_fused_to_peer'][b]:.2f}")


W4A8_GRAPHS = ("fp32", "w4a8_int8", "w4a8_int4", "ort_quantize_static")


def w4a8(fp_model, calib, val, method: str, args) -> dict:
    """One method at W4A8 with the deploy quantizers: the fused graph with int8- and int4-stored weights."""
    t0 = time.perf_counter()
    result = run_ptq(fp_model, calib, method, 4, 8, deploy=True)
    qmodel, seconds = result.model, time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": export_onnx(to_float(qmodel), Path(tmp) / "fp32.onnx"),
                 "w4a8_int8": export_onnx(qmodel, Path(tmp) / "int8.onnx", weights="int8"),
                 "w4a8_int4": export_onnx(qmodel, Path(tmp) / "int4.onnx", weights="int4")}
        paths["ort_quantize_static"] = ort_quantize_static(paths["fp32"], Path(tmp) / "peer.onnx", calib)
        sessions = {g: onnx_session(paths[g], args.threads) for g in W4A8_GRAPHS}
        graphs = {g: optimized_graph(paths[g], args.threads) for g in W4A8_GRAPHS}
        sizes = {g: paths[g].stat().st_size for g in W4A8_GRAPHS}
        with eval_mode(qmodel):
            maps = {"fake_quant": evaluate_model(qmodel, val)["map"]}
        for g in W4A8_GRAPHS:
            maps[g] = evaluate_model(OnnxDetector(sessions[g]), val)["map"]
        lat = latency_table(sessions, (1, args.batch), args.rounds, args.warmup, args.repeats)
    latency = {f"b{b}": {g: v["median_ms"] for g, v in t.items()} for b, t in lat.items()}
    r = {"w_bits": 4, "a_bits": 8, "quantize_seconds": seconds, "deploy": result.report["deploy"], "map": maps,
         "convs": len(quant_layers(qmodel)),
         "w4_convs": sum(v["w_bits"] == 4 for v in result.report["layers"].values()),
         "integer_convs": {g: v["integer_convs"] for g, v in graphs.items()},
         "float_convs": {g: v["float_convs"] for g, v in graphs.items()},
         "optimized_nodes": {g: v["nodes"] for g, v in graphs.items()}, "file_bytes": sizes, "latency_ms": latency,
         "ratio_to_fp32": {b: {g: v / t["fp32"] for g, v in t.items()} for b, t in latency.items()},
         "ratio_to_peer": {b: {g: v / t["ort_quantize_static"] for g, v in t.items()} for b, t in latency.items()}}
    print(f"\n{method} W4A8 (deploy quantizers), {args.val} val images, {args.threads} thread(s)")
    print("  integer convs: " + ", ".join(f"{g} {r['integer_convs'][g]}/{r['convs']}" for g in W4A8_GRAPHS))
    print(f"  mAP50:95: fake quant {maps['fake_quant']:.4f}, " + ", ".join(f"{g} {maps[g]:.4f}" for g in W4A8_GRAPHS))
    for b, t in latency.items():
        print(f"  {b}: " + ", ".join(f"{g} {t[g]:.3f} ms ({r['ratio_to_fp32'][b][g]:.2f}x FP32)" for g in W4A8_GRAPHS))
    return r


if __name__ == "__main__":
    main()
