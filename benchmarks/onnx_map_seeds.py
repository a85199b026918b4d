"""How much of the mAP gap between the fused int8 graph and ONNX Runtime's own quantize_static is noise.

The fused graph of min-max W8A8 (``run_ptq(..., deploy=True)``) and the peer (``quantize_static`` of the same
FP32 graph, min-max, on the same calibration images) differ by about 0.001 mAP50:95 on the 500 val images of
seed 0. This script repeats the comparison over calibration seeds (``--seeds``, 256 images each) and two val
sets of 500 images (val seeds 0 and 1, different images): for each pair, the mAP of the torch twin, of the
fused graph and of the first export (``qdq``) in ONNX Runtime, of the peer, and of the twin with its deploy
quantizers off. The deployment chapter reads the JSON (default ``benchmarks/results/onnx_map_seeds.json``,
written atomically after every seed).

Usage (from the repository root):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_map_seeds.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.deploy import ort_quantize_static
from detptq_mini.evaluate import evaluate_model
from detptq_mini.export import OnnxDetector, export_onnx, onnx_session, to_float
from detptq_mini.pipeline import run_ptq
from detptq_mini.quant import deploy_quantizers
from detptq_mini.utils import atomic_write_json, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    ap.add_argument("--val-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--json", default="benchmarks/results/onnx_map_seeds.json", help="the result file ('': none)")
    args = ap.parse_args()
    seed_everything(0)
    torch.set_num_threads(1)
    fp_model = load_pretrained()
    vals = {v: ShapesDataset("val", args.val, seed=v) for v in args.val_seeds}
    res = {"onnxruntime": ort.__version__, "torch": torch.__version__, "method": "minmax", "w_bits": 8,
           "a_bits": 8, "calib_images": args.calib, "val_images": args.val, "runs": {}}
    for seed in args.seeds:
        calib = ShapesDataset("calib", args.calib, seed=seed).images()
        t0 = time.perf_counter()
        result = run_ptq(fp_model, calib, "minmax", 8, 8, deploy=True)
        qmodel = result.model
        run = {"calib_seed": seed, "deploy": result.report["deploy"], "quantize_seconds": time.perf_counter() - t0,
               "map": {}}
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(to_float(qmodel), Path(tmp) / "fp32.onnx")
            paths = {"fused": export_onnx(qmodel, Path(tmp) / "fused.onnx"),
                     "qdq": export_onnx(qmodel, Path(tmp) / "qdq.onnx", graph="qdq"),
                     "ort_quantize_static": ort_quantize_static(fp32, Path(tmp) / "peer.onnx", calib)}
            sessions = {g: onnx_session(p) for g, p in paths.items()}
            for v, val in vals.items():
                maps = {"twin": evaluate_model(qmodel, val)["map"]}
                for g, s in sessions.items():
                    maps[g] = evaluate_model(OnnxDetector(s), val)["map"]
                quantizers = deploy_quantizers(qmodel)
                for q in quantizers.values():
                    q.enabled = False
                maps["twin_deploy_off"] = evaluate_model(qmodel, val)["map"]
                for q in quantizers.values():
                    q.enabled = True
                run["map"][f"val{v}"] = maps
                print(f"calib seed {seed}, val seed {v}: " + ", ".join(f"{k} {m:.4f}" for k, m in maps.items()),
                      flush=True)
        res["runs"][f"calib{seed}"] = run
        if args.json:
            atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
