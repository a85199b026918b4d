"""ONNX Runtime on CPU: the W8A8 QDQ graph against the FP32 graph of the same model, in one run.

Quantizes the shipped detector W8A8 with min-max (64 calibration images, seed 0), exports it as an ONNX QDQ
graph and its FP32 twin (the same BN-folded convs, no Q/DQ), then prints:

* mAP on the 500 val images: FP32 torch, fake-quant torch, QDQ in ONNX Runtime, FP32 in ONNX Runtime;
* the per-conv check (every exported conv within one quantization step of the fake-quant conv) and the drift
  of the whole network's outputs, in steps;
* latency per image (median of ``--repeats`` timed runs after ``--warmup``, same session options, same
  threads) for batch 1 and batch ``--batch``, and the QDQ / FP32 ratio.

Usage (from the repository root; ``OMP_NUM_THREADS=1`` keeps torch off the timed cores):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_latency.py [--threads 1] [--repeats 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.evaluate import evaluate_model
from detptq_mini.export import (OnnxDetector, check_layers, compare_outputs, export_onnx, latency_per_image,
                                onnx_session, qdq_summary, to_float)
from detptq_mini.pipeline import run_ptq
from detptq_mini.utils import atomic_write_json, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="the second batch size timed (per image)")
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    seed_everything(0)
    torch.set_num_threads(1)

    fp_model = load_pretrained()
    qmodel = run_ptq(fp_model, ShapesDataset("calib", 64, seed=0), "minmax", 8, 8).model
    val = ShapesDataset("val", args.val, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        qdq_path = export_onnx(qmodel, Path(tmp) / "w8a8_qdq.onnx")
        fp_path = export_onnx(to_float(qmodel), Path(tmp) / "fp32.onnx")
        summary = qdq_summary(qdq_path)
        qdq, fp = onnx_session(qdq_path, args.threads), onnx_session(fp_path, args.threads)
        maps = {
            "fp32 torch": evaluate_model(fp_model, val)["map"],
            "w8a8 fake-quant torch": evaluate_model(qmodel, val)["map"],
            "w8a8 QDQ onnxruntime": evaluate_model(OnnxDetector(qdq), val)["map"],
            "fp32 onnxruntime": evaluate_model(OnnxDetector(fp), val)["map"],
        }
        layers = check_layers(qmodel, val.images(0, 8), args.threads)
        drift = compare_outputs(qmodel, qdq, val.images())
        lat = {}
        for b in (1, args.batch):
            for name, sess in (("fp32", fp), ("w8a8_qdq", qdq)):
                lat[f"{name}_b{b}"] = latency_per_image(sess, warmup=args.warmup, repeats=args.repeats, batch=b)

    res = {
        "onnxruntime": ort.__version__, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "val_images": args.val, "graph": summary, "map": maps,
        "map_diff_qdq_vs_fake_quant": maps["w8a8 QDQ onnxruntime"] - maps["w8a8 fake-quant torch"],
        "per_conv_max_steps": layers["max_steps"], "per_conv_within_step": layers["within_step"],
        "output_drift": drift, "latency_ms_per_image": lat,
        "ratio_qdq_to_fp32": {f"b{b}": lat[f"w8a8_qdq_b{b}"]["median_ms"] / lat[f"fp32_b{b}"]["median_ms"]
                              for b in (1, args.batch)},
    }
    print(f"onnxruntime {res['onnxruntime']}, torch {res['torch']}, {args.threads} thread(s), CPU")
    print(f"QDQ graph: opset {summary['opset']}, {summary['qdq_convs']}/{summary['convs']} convs between Q/DQ, "
          f"{summary['per_channel_weight_convs']} with per-channel weights, "
          f"{summary['nodes'].get('QuantizeLinear', 0)} QuantizeLinear, "
          f"{summary['nodes'].get('DequantizeLinear', 0)} DequantizeLinear")
    print(f"\nmAP on {args.val} val images")
    for k, v in maps.items():
        print(f"  {k:<24} {v:.4f}")
    print(f"  QDQ ORT - fake quant     {res['map_diff_qdq_vs_fake_quant']:+.4f}")
    print(f"\nper conv, ORT vs fake quant on the same input: max {layers['max_steps']:.3g} steps "
          f"({'within' if layers['within_step'] else 'NOT within'} one step)")
    print("whole network, ORT vs fake quant (drift of rounding-boundary flips):")
    for k, v in drift.items():
        print(f"  {k}: max |diff| {v['max_abs']:.4g} ({v['max_steps']:.3g} steps), mean {v['mean_abs']:.4g}")
    print("\nlatency per image, median [min, max] ms")
    for b in (1, args.batch):
        f, q = lat[f"fp32_b{b}"], lat[f"w8a8_qdq_b{b}"]
        print(f"  batch {b:>3}: FP32 {f['median_ms']:.3f} [{f['min_ms']:.3f}, {f['max_ms']:.3f}]   "
              f"W8A8 QDQ {q['median_ms']:.3f} [{q['min_ms']:.3f}, {q['max_ms']:.3f}]   "
              f"ratio QDQ/FP32 {res['ratio_qdq_to_fp32'][f'b{b}']:.3f}")
    if args.json:
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
