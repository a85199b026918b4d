"""Where does a quantized checkpoint lose its mAP? Switch groups of activation quantizers off and re-measure.

For a checkpoint written by ``detptq-mini quantize --out``: the mAP as saved, then with the input (activation)
quantizers of one part of the network switched off (those inputs FP, everything else as saved), and with every
activation quantizer off (the weights' share of the loss). Weights cannot be switched back to FP after
reconstruction (their rounding is written into them), so the weights-only row is the loss of the saved weights.

    .venv/bin/python benchmarks/what_limits.py runs/R5.pt --val 200
"""

from __future__ import annotations

import argparse

from detptq_mini import load_pretrained
from detptq_mini.checkpoint import load_quantized
from detptq_mini.data import ShapesDataset
from detptq_mini.evaluate import evaluate_model
from detptq_mini.quant import quant_layers

GROUPS = {
    "head.p3.box (stride-8 box branch)": ("head.p3.box.",),
    "head (all six branches)": ("head.",),
    "neck": ("neck.",),
    "backbone": ("backbone.",),
    "every activation": ("",),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--val", type=int, default=200)
    args = ap.parse_args(argv)
    val = ShapesDataset("val", args.val, seed=0)
    fp = evaluate_model(load_pretrained(), val)["map"]
    q, report = load_quantized(args.checkpoint)
    layers = quant_layers(q)
    rows = {"FP32": fp, "as saved": evaluate_model(q, val)["map"]}
    for label, prefixes in GROUPS.items():
        chosen = [n for n in layers if n.startswith(prefixes)]
        for n in chosen:
            layers[n].input_quantizer.enabled = False
        rows[f"FP inputs: {label}"] = evaluate_model(q, val)["map"]
        for n in chosen:
            layers[n].input_quantizer.enabled = True
    print(f"{report['method']} W{report['w_bits']}A{report['a_bits']}, {args.val} val images")
    for k, v in rows.items():
        print(f"  {k:45s} mAP {v:.4f}  ({v / fp:.1%} of FP)")
    return rows


if __name__ == "__main__":
    main()
