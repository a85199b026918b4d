"""Why published BRECQ trails at W4A4 here: where the error comes from, and what each of its two stages does.

Part 1 (forward passes only): with the starting scales of the ``brecq`` cells (the Lp search at p = 2, 256
calibration images of seed 0), the error at every unit's output against the FP model, the whole prefix quantized,
with (a) only the weights quantized, (b) only the activations, (c) both (W4A4 as deployed). BRECQ's first stage
learns the rounding with the activations in float, so it can only shrink (a); the second stage learns only the
activation step sizes.

Part 2 (training, a few minutes): BRECQ's two stages on the first units only (``--units``), at a budget given on the
command line, with the second stage at several learning rates (0 = the first stage alone). For each unit: the
weight-only loss before and after the first stage, and the W4A4 loss (every element quantized) after both.

    .venv/bin/python benchmarks/brecq_stages.py --out benchmarks/results/brecq_stages.json

Every number in the JSON is measured by this script; it runs with one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from detptq_mini.checkpoint import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.pipeline import PTQConfig, _calibrate, calibration_images
from detptq_mini.quant import fold_bn, quantize_model, set_quant_state
from detptq_mini.reconstruction import lp_loss, reconstruct
from detptq_mini.utils import atomic_write_json

STATES = {"weights only": (True, False), "activations only": (False, True), "both (W4A4)": (True, True)}


def unit_errors(qmodel, fp_model, images: torch.Tensor, chunk: int = 32) -> dict[str, dict[str, float]]:
    """``{state: {unit: mean over images of the p = 2 loss at the unit's output}}``, the whole prefix quantized."""
    names = [u.name for u in qmodel.units]
    out = {}
    with torch.no_grad():
        ref = []
        for i in range(0, len(images), chunk):
            env = fp_model.run({"image": fp_model.prepare(images[i:i + chunk])})
            ref.append({u.name: env[u.output] for u in fp_model.units})
        for state, (w, a) in STATES.items():
            set_quant_state(qmodel, weights=w, acts=a)
            tot = dict.fromkeys(names, 0.0)
            for k, i in enumerate(range(0, len(images), chunk)):
                x = images[i:i + chunk]
                env = qmodel.run({"image": qmodel.prepare(x)})
                for u in qmodel.units:
                    tot[u.name] += float(lp_loss(env[u.output], ref[k][u.name], 2.0)) * len(x)
            out[state] = {n: tot[n] / len(images) for n in names}
        set_quant_state(qmodel, weights=True, acts=True)
    return out


def weight_only_losses(qmodel, fp_model, images, units) -> dict[str, float]:
    errs = unit_errors(qmodel, fp_model, images)["weights only"]
    return {u: errs[u] for u in units}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/brecq_stages.json")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--units", default="backbone.stem,backbone.down1")
    ap.add_argument("--iters", type=int, default=400, help="first-stage steps per unit (the second gets a quarter)")
    ap.add_argument("--lr-v", type=float, default=1e-3)
    ap.add_argument("--lr-acts", default="0,0.0004,0.004", help="second-stage learning rates (0: stage 1 alone)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    units = args.units.split(",")
    model = load_pretrained()
    images = calibration_images(ShapesDataset("calib", args.calib, seed=0), "cpu")
    fp_model = fold_bn(copy.deepcopy(model).eval())

    def start(lr_act: float):
        cfg = PTQConfig(method="brecq", w_bits=4, a_bits=4, iters=args.iters, lr_v=args.lr_v, lr_act=lr_act)
        q = quantize_model(copy.deepcopy(model).eval(), cfg.quant_config())
        _calibrate(q, images, cfg, False)
        return q, cfg

    t0 = time.perf_counter()
    q, _ = start(0.0)
    errors = unit_errors(q, fp_model, images)
    result = {"settings": {"calib": args.calib, "seed": 0, "w_bits": 4, "a_bits": 4, "starting_scales": "Lp p=2",
                           "loss": "mean over images of the sum of squared errors at the unit's output",
                           "units": units, "iters": args.iters, "act_iters": max(args.iters // 4, 1),
                           "lr_v": args.lr_v, "threads": 1},
              "errors": errors, "stages": {}}
    print(f"{'unit':16s} " + " ".join(f"{s:>18s}" for s in STATES))
    for n in errors["both (W4A4)"]:
        print(f"{n:16s} " + " ".join(f"{errors[s][n]:18.4g}" for s in STATES))
    w_before = weight_only_losses(q, fp_model, images, units)
    for lr in (float(v) for v in args.lr_acts.split(",")):
        q, cfg = start(lr)
        hist = reconstruct(q, fp_model, images, cfg.recon_config(), units=units)
        w_after = weight_only_losses(q, fp_model, images, units)
        rows = {}
        for u in units:
            h = hist.units[u]
            rows[u] = {"weights_only_before": w_before[u], "weights_only_after_stage1": w_after[u],
                       "w4a4_before": h.before, "w4a4_after": h.after,
                       "act_loss_first": h.act_loss[0] if h.act_loss else None,
                       "act_loss_last": h.act_loss[-1] if h.act_loss else None}
            print(f"lr_act {lr:g} {u}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[u].items() if v is not None))
        result["stages"][f"{lr:g}"] = rows
    result["seconds"] = time.perf_counter() - t0
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
