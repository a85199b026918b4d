"""Where the deploy quantizers cost accuracy: the twin with each kind of them on or off, and with the peer's scales.

A diagnosis on the val images (nothing here chooses anything for the library; the deploy quantizers' p is
chosen by ODOL on the calibration images, ``run_ptq(..., deploy=True)``). The min-max W8A8 model on 256
calibration images (seed 0), with the deploy quantizers of the fused graph (each conv's output, each SiLU's
sigmoid), each calibrated on its own tensor (the sample :func:`detptq_mini.quant.calibrate_deploy` draws), is
evaluated in torch (the fused graph's twin) on 500 val images with:

* no deploy quantizer, all of them at ``s_2*`` (what ODOL chose for this model), all at min-max;
* one kind at a time (the conv outputs, the prediction convs' outputs, the sigmoids), at ``s_2*`` or min-max;
* the scales of ONNX Runtime's own ``quantize_static`` (the peer) copied into the twin: every conv's input,
  output and sigmoid scale read from the peer's graph. The peer also quantizes the adds and concatenations,
  which the twin does not.

The JSON (default ``benchmarks/results/deploy_quantizers.json``, written atomically) is quoted by the method
page, section 7.

Usage (from the repository root):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deploy_quantizers.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch

from detptq_mini import load_pretrained
from detptq_mini.data import ShapesDataset
from detptq_mini.deploy import ort_quantize_static
from detptq_mini.evaluate import evaluate_model
from detptq_mini.export import export_onnx, to_float
from detptq_mini.lp import lp_scale_search
from detptq_mini.quant import (QuantConfig, calibrate_deploy, calibrate_minmax, deploy_quantizers, qparams_from_range,
                               quant_layers, quantize_model)
from detptq_mini.utils import atomic_write_json, seed_everything


def peer_scales(path) -> dict:
    """``{conv name: {"input", "output", "gate"}}`` (scale, zero point) of a ``quantize_static`` QDQ graph: the pair
    on each conv's input, on its output and on the sigmoid that reads it (None for a conv without one)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def qparams(node):
        return float(inits[node.input[1]]), int(inits[node.input[2]])

    out = {}
    for conv in (n for n in g.node if n.op_type == "Conv"):
        name = producer[conv.input[1]].input[0].removesuffix(".weight_quantized")
        q_out = next(n for n in readers[conv.output[0]] if n.op_type == "QuantizeLinear")
        dq_out = readers[q_out.output[0]][0]
        sigmoid = next((n for n in readers.get(dq_out.output[0], []) if n.op_type == "Sigmoid"), None)
        gate = None
        if sigmoid is not None:
            gate = qparams(next(n for n in readers[sigmoid.output[0]] if n.op_type == "QuantizeLinear"))
        out[name] = {"input": qparams(producer[conv.input[0]]), "output": qparams(q_out), "gate": gate}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--json", default="benchmarks/results/deploy_quantizers.json", help="the result file ('': none)")
    args = ap.parse_args()
    seed_everything(0)
    torch.set_num_threads(1)
    calib = ShapesDataset("calib", args.calib, seed=0).images()
    val = ShapesDataset("val", args.val, seed=0)
    qmodel = quantize_model(load_pretrained(), QuantConfig(w_bits=8, a_bits=8, deploy=True))
    calibrate_minmax(qmodel, calib)
    quantizers = deploy_quantizers(qmodel)
    drawn = []  # calibrate_deploy calls `search` once per quantizer, in the order of deploy_quantizers

    def record(x):
        drawn.append(x)
        return qparams_from_range(x.min(), x.max(), 8, False)

    calibrate_deploy(qmodel, calib, max_elements=2**14, seed=0, search=record)  # as run_ptq(..., deploy=True)
    samples = dict(zip(quantizers, drawn))
    rules = {"p2": lambda x: lp_scale_search(x, 8, (2.0,), grid=100)[2.0],
             "minmax": lambda x: qparams_from_range(x.min(), x.max(), 8, False)}
    kinds = {"all": lambda n: True, "conv outputs": lambda n: n.endswith("output_quantizer"),
             "prediction conv outputs": lambda n: ".pred." in n, "sigmoids": lambda n: n.endswith("gate_quantizer")}
    res = {"onnxruntime": ort.__version__, "torch": torch.__version__, "method": "minmax", "calib_images": args.calib,
           "val_images": args.val, "map": {}}

    def measure(label: str) -> None:
        res["map"][label] = evaluate_model(qmodel, val)["map"]
        print(f"{label}: {res['map'][label]:.4f}", flush=True)

    for q in quantizers.values():
        q.enabled = False
    measure("none")
    for rule, fn in rules.items():
        params = {n: fn(x) for n, x in samples.items()}
        for kind, on in kinds.items():
            for n, q in quantizers.items():
                q.set_qparams(*params[n])
                q.enabled = on(n)
            measure(f"{kind} at {rule}")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(to_float(qmodel), Path(tmp) / "fp32.onnx")
        peer = peer_scales(ort_quantize_static(fp32, Path(tmp) / "peer.onnx", calib))
    gates = 0
    for name, layer in quant_layers(qmodel).items():
        layer.input_quantizer.set_qparams(*peer[name]["input"])
        layer.output_quantizer.set_qparams(*peer[name]["output"])
        layer.output_quantizer.enabled = True
        if peer[name]["gate"] is not None:
            act = quantizers[f"{name.removesuffix('.conv')}.act.gate_quantizer"]
            act.set_qparams(*peer[name]["gate"])
            act.enabled = True
            gates += 1
    if gates != sum(n.endswith("gate_quantizer") for n in quantizers):
        raise RuntimeError(f"the peer's graph gave {gates} sigmoid scales for the twin's sigmoids")
    measure("the peer's scales (inputs, outputs, sigmoids)")
    if args.json:
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
