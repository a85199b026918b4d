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

Usage (from the repository root; ``OMP_NUM_THREADS=1`` keeps torch off the timed cores):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_latency.py [--threads 1] [--rounds 5] [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import time

import onnxruntime as ort
import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.deploy import GRAPH_NAMES, compare_graphs
from detptq_mini.evaluate import evaluate_model
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
    ap.add_argument("--json", default="benchmarks/results/onnx_latency.json", help="the result file ('' : none)")
    args = ap.parse_args()
    seed_everything(0)
    torch.set_num_threads(1)

    fp_model = load_pretrained()
    calib = ShapesDataset("calib", args.calib, seed=0).images()
    val = ShapesDataset("val", args.val, seed=0)
    res = {"onnxruntime": ort.__version__, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": args.threads, "calib_images": args.calib,
           "val_images": args.val, "batches": [1, args.batch], "graphs": list(GRAPH_NAMES),
           "fp32_torch_map": evaluate_model(fp_model, val)["map"], "methods": {}}
    for method in args.methods:
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


if __name__ == "__main__":
    main()
