"""The paper's V ablation: does learned rounding (AdaRound) move the best p of a layer?

For each studied layer (one at a time, everything else FP), and each p in P: ODOL with s_p* and
round-to-nearest, and ODOL with s_p* plus a short AdaRound of that layer (Lp loss with the same p).
Prints the table and the verdict, writes benchmarks/results/rounding_ablation.json (atomically).

    .venv/bin/python benchmarks/rounding_ablation.py            # W4A4, 64 calibration images, 200 steps
    .venv/bin/python benchmarks/rounding_ablation.py --lr-v 0.01 --out benchmarks/results/rounding_ablation_lr0.01.json
    .venv/bin/python benchmarks/rounding_ablation.py --iters 50 --calib 32 --out /tmp/ra.json

``--lr-v`` is AdaRound's Adam learning rate (default 1e-3, the reference implementations' rate, sized for 20,000
steps; 1e-2 is the rate the benchmark suites use for their 1,000 steps). ``--threads`` sets torch's threads.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.lp import P_DEFAULT, search_model_scales
from detptq_mini.quant import QuantConfig, calibrate_minmax, quantize_model
from detptq_mini.reconstruction import ReconConfig
from detptq_mini.studies import rounding_ablation
from detptq_mini.utils import atomic_write_json

LAYERS = ("backbone.down1.conv", "backbone.c2f2.cv1.conv", "backbone.c2f3.m.0.cv2.conv", "neck.td3.cv2.conv",
          "neck.bu5.cv1.conv", "head.p3.cls.cv1.conv", "head.p3.box.cv2.conv", "head.p5.box.cv1.conv")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr-v", type=float, default=ReconConfig().lr_v, help="AdaRound's Adam learning rate")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rounding_ablation.json"))
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    images = ShapesDataset("calib", args.calib, seed=args.seed).images()
    q = calibrate_minmax(quantize_model(load_pretrained(), QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits)), images)
    scales = search_model_scales(q, images, P_DEFAULT, layers=LAYERS)
    ab = rounding_ablation(q, images, scales, LAYERS, P_DEFAULT, iters=args.iters,
                           config=ReconConfig(lr_v=args.lr_v))
    best_s, best_r, moved = ab.best("scale"), ab.best("rounding"), ab.moved()
    print(f"{'layer':28s} {'best p (scale)':>15s} {'best p (+V)':>12s}  moved")
    for layer in LAYERS:
        print(f"{layer:28s} {best_s[layer]:15.1f} {best_r[layer]:12.1f}  {'yes' if moved[layer] else 'no'}")
    n_moved = sum(moved.values())
    print(f"learned rounding moved the best p in {n_moved} of {len(LAYERS)} layers")
    result = {
        "command": "python benchmarks/rounding_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"w_bits": args.w_bits, "a_bits": args.a_bits, "calib": args.calib, "iters": args.iters,
                     "seed": args.seed, "lr_v": args.lr_v,
                     "scales": "s_p* on the studied layer, every other layer FP"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
        "odol_scale": {k: {str(p): v for p, v in row.items()} for k, row in ab.scale.items()},
        "odol_rounding": {k: {str(p): v for p, v in row.items()} for k, row in ab.rounding.items()},
        "best_scale": best_s, "best_rounding": best_r, "moved": moved, "n_moved": n_moved,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
