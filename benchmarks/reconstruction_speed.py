"""Cost of one reconstruction step, unit by unit, against the FP forward + backward of the same unit.

For every unit of the shipped detector at W4A4 (min-max start): the median time of one FP forward + backward
of the unit at the reconstruction batch size (weights require grad, as in training), and the marginal
time of one reconstruction step (AdaRound weights, learned step sizes, the Lp loss, the optimiser steps) with
quant_prob = 1 (BRECQ) and 0.5 (QDrop). Prints the table, the sum over units (one step over every unit) and
the peak memory of the process; writes benchmarks/results/reconstruction_speed.json (atomically).

    .venv/bin/python benchmarks/reconstruction_speed.py                  # batch 32, 30 timed steps
    .venv/bin/python benchmarks/reconstruction_speed.py --steps 10 --out /tmp/speed.json

Run it alone on the machine: a second busy process makes torch's threads thrash.
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.quant import QuantConfig, calibrate_minmax, fold_bn, quantize_model
from detptq_mini.reconstruction import ReconConfig, reconstruct_unit
from detptq_mini.utils import atomic_write_json


def _median_step_seconds(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "reconstruction_speed.json"))
    args = ap.parse_args(argv)
    images = ShapesDataset("calib", args.calib, seed=0).images()
    fp = fold_bn(load_pretrained())
    q = calibrate_minmax(quantize_model(load_pretrained(), QuantConfig(w_bits=4, a_bits=4)), images)
    with torch.no_grad():
        env = fp.capture(images, 0)
    rows = {}
    print(f"{'unit':16s} {'FP fwd+bwd':>11s} {'BRECQ step':>11s} {'QDrop step':>11s} {'ratio':>6s}  (ms)")
    for u in fp.units:
        mod_fp = fp.get_submodule(u.name)
        x = [env[n] for n in u.inputs]
        with torch.no_grad():
            y = mod_fp(*x)
        xb = [t[:args.batch] for t in x]

        def fp_step():
            mod_fp.zero_grad(set_to_none=True)
            mod_fp(*xb).square().mean().backward()

        t_fp = _median_step_seconds(fp_step, args.steps)
        row = {"fp": t_fp}
        for label, prob in (("brecq", 1.0), ("qdrop", 0.5)):
            # the marginal cost of a step: (time of 2n steps - time of n steps) / n, so set-up (AdaRound state,
            # optimisers, the QDrop mask pool) is not counted
            seconds = []
            for iters in (args.steps, 2 * args.steps):
                cfg = ReconConfig(iters=iters, batch_size=args.batch, quant_prob=prob)
                seconds.append(reconstruct_unit(copy.deepcopy(q.get_submodule(u.name)), x, x, y, 2.0, cfg,
                                                u.name).seconds)
            row[label] = max(seconds[1] - seconds[0], 0.0) / args.steps
        rows[u.name] = row
        print(f"{u.name:16s} {t_fp * 1e3:11.1f} {row['brecq'] * 1e3:11.1f} {row['qdrop'] * 1e3:11.1f} "
              f"{row['qdrop'] / t_fp:6.2f}")
        with torch.no_grad():
            env[u.output] = y
    total = {k: sum(r[k] for r in rows.values()) for k in ("fp", "brecq", "qdrop")}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'all units':16s} {total['fp'] * 1e3:11.1f} {total['brecq'] * 1e3:11.1f} {total['qdrop'] * 1e3:11.1f} "
          f"{total['qdrop'] / total['fp']:6.2f}")
    print(f"worst unit ratio (QDrop / FP): {max(r['qdrop'] / r['fp'] for r in rows.values()):.2f}; "
          f"peak memory {peak_mb:.0f} MB; torch threads {torch.get_num_threads()}")
    result = {"command": "python benchmarks/reconstruction_speed.py " + " ".join(argv or []),
              "settings": vars(args), "units_seconds": rows, "all_units_seconds": total, "peak_rss_mb": peak_mb,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}}
    atomic_write_json(args.out, result)
    return result

if __name__ == "__main__":
    main()
