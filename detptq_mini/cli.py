"""The ``detptq-mini`` command line: ``train``, ``evaluate``, ``quantize``, ``benchmark``, ``export``.

Exit status 0 on success; 2 on bad usage or bad input, with a one-line error on stderr and no traceback.
Every command takes ``--device`` (``cpu`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import get_args

import torch

from . import benchmark  # used as benchmark.X, so that tests can stand in for benchmark.run_suite
from .adapter import DEFAULT_ANCHOR_SIZES, RetinaNetConfig
from .checkpoint import MODELS, WEIGHTS_DIR, load_any, load_pretrained, pretrained_info, save_quantized
from .data import ShapesDataset
from .evaluate import evaluate_model
from .deploy import compare_graphs, optimized_graph
from .export import (GRAPHS, WEIGHTS, OnnxDetector, check_exportable, check_layers, compare_outputs, export_onnx,
                     latency_per_image, onnx_session, qdq_summary, to_float)
from .odol import ClsMode, LocMode
from .detptq import Rest
from .pipeline import DETPTQ_USES, METHODS, RECON_METHODS, run_ptq
from .quant import PROTOCOLS
from .reconstruction import LOSS_NORMS, QDROP_INPUTS
from .train import RetinaTrainConfig, TrainConfig, anchor_recall, train, train_retinanet
from .utils import resolve_device

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention, without the usage dump)
        raise UsageError(message)


# the choices of --odol-cls / --odol-loc (ODOL's terms) and --loss-norm
_ODOL_CLS: tuple[str, ...] = get_args(ClsMode)
_ODOL_LOC: tuple[str, ...] = get_args(LocMode)
_LOSS_NORMS: tuple[str, ...] = LOSS_NORMS
_RESTS: tuple[str, ...] = get_args(Rest)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


def _check_out_dir(path: str, flag: str) -> None:
    if not Path(path).parent.is_dir():
        raise UsageError(f"{flag} {path!r}: directory {str(Path(path).parent)!r} does not exist")


_MODEL_HELP = "the detector: yolo (default, the shipped YOLO-style model) or retinanet-r18 (RetinaNet-ResNet18-FPN)"
#: where ``train --model retinanet-r18`` keeps its training state and float32 model by default (``/runs/`` is ignored
#: by git, and lies outside the package, whose ``weights/*.pt`` all ship)
RETINA_STATE_DIR = Path("runs") / "retinanet-r18"
_TRAIN_HELP = (
    "retrain an FP detector and write it into the package. --model yolo (default): the shipped YOLO-style detector "
    "(about 30 CPU minutes). --model retinanet-r18: RetinaNet-ResNet18-FPN from scratch, sized for about 90 minutes "
    "with one torch thread on a free core (--threads 1; measured about 3.2 s a step of batch 16): 4,000 images, "
    "batch 16, 7 epochs of 250 steps (1,750 steps), AdamW lr 2e-4, 100 warm-up steps then cosine decay; the state "
    "is saved after every epoch (--resume continues), the float16 weights ship once their mAP is checked against "
    "float32")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="detptq-mini", description="Task-loss-guided PTQ (DetPTQ) of a small YOLO-style detector.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help=_TRAIN_HELP, description=_TRAIN_HELP)
    t.add_argument("--model", choices=MODELS, default="yolo", help=_MODEL_HELP)
    t.add_argument("--out-dir", default=None,
                   help="where to write detector.pt/.json (yolo) or retinanet-r18.pt/.json (default: the package's "
                        "weights/)")
    t.add_argument("--epochs", type=_positive_int, default=None, help="override the number of epochs (default: as shipped)")
    t.add_argument("--train-size", type=_positive_int, default=None,
                   help="override the number of training images (default: as shipped, 8000)")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help="override the batch size (default: as shipped)")
    t.add_argument("--val", type=_positive_int, default=None,
                   help="override the number of val images of the final mAP (default: as shipped, 500)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--state-dir", default=None,
                   help=f"retinanet-r18: where the training state (after every epoch) and the float32 model go "
                        f"(default: {RETINA_STATE_DIR})")
    t.add_argument("--resume", action="store_true", help="retinanet-r18: continue from the state in --state-dir")
    t.add_argument("--check-anchors", action="store_true",
                   help="retinanet-r18: print the anchors' recall on the training boxes (the fraction with an anchor "
                        "at IoU >= 0.5 and >= 0.4), torchvision's default sizes and ours, and train nothing")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (torch.set_num_threads; default: torch's default, the cores or "
                        "OMP_NUM_THREADS); the output says the threads used")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.add_argument("--progress", action="store_true", help="show a progress bar")
    t.add_argument("--device", default="cpu")

    e = sub.add_parser("evaluate", help="COCO mAP on the 500-image val split (seed 0)")
    e.add_argument("--model", choices=MODELS, default="yolo", help=_MODEL_HELP + "; a --checkpoint must hold it")
    e.add_argument("--checkpoint", default=None, help="a checkpoint (default: the shipped FP model)")
    e.add_argument("--val", type=_positive_int, default=500, help="number of val images")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--progress", action="store_true")
    e.add_argument("--device", default="cpu")

    q = sub.add_parser("quantize", help="quantize the shipped model with a PTQ method and evaluate it")
    q.add_argument("--model", choices=MODELS, default="yolo", help=_MODEL_HELP + " (its shipped FP weights)")
    q.add_argument("--method", required=True,
                   help="minmax | lp | detptq | brecq | joint | qdrop | detptq-qdrop (see `detptq_mini.pipeline.METHODS`)")
    q.add_argument("--w-bits", type=int, required=True, help="weight bits, 2..8")
    q.add_argument("--a-bits", type=int, required=True, help="activation bits, 2..8")
    q.add_argument("--p", type=float, default=None,
                   help="the fixed p of lp, brecq, joint and qdrop (default 2.0); an error with detptq*, which choose p "
                        "themselves")
    q.add_argument("--iters", type=_positive_int, default=None,
                   help="reconstruction steps per unit for brecq | joint | qdrop | detptq-qdrop (default 2000; brecq: of "
                        "its first stage)")
    q.add_argument("--lr-v", type=float, default=None,
                   help="reconstruction: Adam learning rate of AdaRound's rounding variables (default 1e-3)")
    q.add_argument("--lr-act", type=float, default=None,
                   help="reconstruction: Adam learning rate of the activation step sizes (default 4e-5; brecq's "
                        "second stage 4e-4, its reference's)")
    q.add_argument("--quant-prob", type=float, default=None,
                   help="qdrop | detptq-qdrop: probability that an activation element is quantized during "
                        "reconstruction (default 0.5)")
    q.add_argument("--qdrop-input", choices=QDROP_INPUTS, default=None,
                   help="qdrop | detptq-qdrop: 'one-coin' (default: the reference's one coin per element at a unit's "
                        "input) or 'two-coin' (the earlier scheme, an ablation)")
    q.add_argument("--act-iters", type=int, default=None,
                   help="brecq: steps per unit of the second stage, the step sizes (default --iters / 4); 0 skips it")
    q.add_argument("--act-p", type=float, default=None,
                   help="brecq: the p of the second stage's loss (default 2.4, the reference's)")
    q.add_argument("--loss-norm", choices=_LOSS_NORMS, default=None,
                   help="reconstruction: 'before' divides each unit's Lp loss by its value before reconstruction "
                        "(an experiment; default 'none', BRECQ's loss as it is)")
    q.add_argument("--rest", choices=_RESTS, default=None,
                   help="detptq | detptq-qdrop: the layers after the one being tried are 'fp' (default) or "
                        "'quantized' (at p = 2) while DetPTQ chooses p")
    q.add_argument("--detptq-use", choices=DETPTQ_USES, default=None,
                   help="detptq-qdrop: where the chosen p goes: 'both' (default: starting scales and loss), 'scales' "
                        "(the loss at p = 2) or 'loss' (the p = 2 scales)")
    q.add_argument("--odol-cls", choices=_ODOL_CLS, default=None,
                   help="detptq | detptq-qdrop: the classification term of ODOL (default kl)")
    q.add_argument("--odol-loc", choices=_ODOL_LOC, default=None,
                   help="detptq | detptq-qdrop: the localization term of ODOL (default l1)")
    q.add_argument("--calib", type=_positive_int, default=64, help="number of calibration images (default 64)")
    q.add_argument("--seed", type=int, default=0, help="calibration seed (the seed of the calib split)")
    q.add_argument("--val", type=_positive_int, default=500, help="number of val images for the mAP")
    q.add_argument("--no-8bit-stem", action="store_true", help="quantize the stem conv at the target bits too")
    q.add_argument("--no-8bit-pred", action="store_true", help="quantize the head's prediction convs at the target bits too")
    q.add_argument("--protocol", choices=PROTOCOLS, default="ours",
                   help="which convs are quantized: ours (default) every conv; head-fp all but the detection head's, "
                        "which stay FP (QDrop's COCO code)")
    q.add_argument("--batch-size", type=_positive_int, default=None,
                   help="calibration images per forward (default: up to 32); at most --calib")
    q.add_argument("--out", default=None, help="write the quantized checkpoint here (atomically)")
    q.add_argument("--state", default=None, metavar="PATH",
                   help="save the run's progress here (after the scales, then after every reconstructed unit) and "
                        "resume from it when it exists: a stopped run goes on where it stopped, with the same "
                        "result; deleted when the run completes")
    q.add_argument("--deploy", action="store_true",
                   help="W8A8 or W4A8: also calibrate the quantizers of the fused int8 graph (each conv's output, each "
                        "SiLU's sigmoid) on the calibration images, so the mAP reported and saved is the deployed "
                        "graph's; `export` needs them for its default --graph fused")
    q.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads of this process (torch.set_num_threads; default: torch's default, the "
                        "cores or OMP_NUM_THREADS); the output says the threads used. `benchmark --jobs` sets it")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--progress", action="store_true")
    q.add_argument("--device", default="cpu")

    b = sub.add_parser("benchmark", help="run a benchmark suite, one subprocess per cell, resumable")
    b.add_argument("--suite", default=None,
                   help=" | ".join(f"{s} (default)" if s == "simple" else s for s in benchmark.SUITES)
                   + " (see `detptq_mini.benchmark.SUITES`; their cells and costs: benchmarks/README.md)")
    b.add_argument("--quick", action="store_true", help="the same as --suite quick: every method on a tiny slice")
    b.add_argument("--out", default=None,
                   help="result JSON (default: benchmarks/results/<suite>.json; <model>-<suite>.json for another model "
                        "than yolo)")
    b.add_argument("--model", choices=MODELS, default="yolo",
                   help=_MODEL_HELP + "; the suite's cells on that model (its name starts their keys when it is not "
                        "yolo)")
    b.add_argument("--only", action="append", default=None, metavar="SUBSTRING",
                   help="run only the cells whose key contains this; repeatable (a cell that matches any)")
    b.add_argument("--exclude", action="append", default=None, metavar="SUBSTRING",
                   help="skip the cells whose key contains this (e.g. --exclude=-i: all but the reconstruction "
                        "cells); repeatable")
    b.add_argument("--reuse", action="append", default=None, metavar="RESULTS_JSON",
                   help="copy a cell from this result file of another suite when it holds the same cell done "
                        "(e.g. --suite ablations --reuse benchmarks/results/full.json); repeatable")
    b.add_argument("--list", action="store_true", help="list the cells and their status, and count them; run nothing")
    b.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="run N cells at once (default 1), each with 1/N of torch's threads (OMP_NUM_THREADS, "
                        "MKL_NUM_THREADS and quantize --threads: at least 1) so that they share the cores; the file "
                        "is still rewritten after every cell, in the suite's order, and records each cell's jobs "
                        "and threads")
    b.add_argument("--stop-after", type=_positive_float, default=None, metavar="MINUTES",
                   help="start no cell after this many minutes; the running cells finish and are recorded, the "
                        "next run resumes with the rest (for background compute that must end in time)")
    b.add_argument("--progress", action="store_true")
    b.add_argument("--device", default="cpu")

    x = sub.add_parser("export", help="write a W8A8 (or W4A8) checkpoint as an ONNX int8 graph and check it in "
                                      "ONNX Runtime")
    x.add_argument("--model", choices=MODELS, default="yolo",
                   help="the checkpoint's detector: yolo only (the int8 graph is the YOLO-style detector's; "
                        "retinanet-r18 is an error)")
    x.add_argument("--checkpoint", required=True,
                   help="a W8A8 checkpoint written by `quantize --w-bits 8 --a-bits 8 --deploy --out` (without "
                        "--deploy: --graph qdq only)")
    x.add_argument("--graph", choices=GRAPHS, default="fused",
                   help="fused (default): Q/DQ wherever ONNX Runtime fuses integer kernels (needs --deploy at "
                        "quantize); qdq: the first export, Q/DQ on conv inputs and weights only (float convs)")
    x.add_argument("--weights", choices=WEIGHTS, default="int8",
                   help="how a W4A8 checkpoint's 4-bit weights are stored: int8 (default; integer convs) or int4 "
                        "(ONNX int4, opset 21, half the bytes; ONNX Runtime 1.32 runs those convs in float)")
    x.add_argument("--onnx", required=True, help="the .onnx file to write (atomically; its directory must exist)")
    x.add_argument("--val", type=_non_negative_int, default=500,
                   help="val images for the check: outputs and mAP of ONNX Runtime vs the fake-quant model (0: skip)")
    x.add_argument("--dynamo", action="store_true", help="export with the torch.export based exporter")
    x.add_argument("--benchmark", action="store_true",
                   help="--graph fused: also compare, in one run, the mAP, integer-kernel count and latency (batch 1 "
                        "and 16, timed interleaved) of this graph, the qdq graph, ONNX Runtime's own quantize_static "
                        "(min-max, on the checkpoint's calibration images) and FP32")
    x.add_argument("--rounds", type=_positive_int, default=5,
                   help="--graph fused --benchmark: timing rounds, each graph in turn (default 5; a latency is "
                        "the median of its round medians; 1 for a quick look)")
    x.add_argument("--threads", type=_positive_int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    x.add_argument("--json", action="store_true", help="print one JSON object")
    x.add_argument("--device", default="cpu", help="where the fake-quant reference runs (ONNX Runtime: CPU)")
    return p


def _train_config(args, cfg):
    """``cfg`` with the command line's overrides (checked together: a batch cannot hold more than the images)."""
    flags = {"epochs": "epochs", "train_size": "train_size", "batch_size": "batch_size", "val": "val_size"}
    overrides = {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}
    batch, images = overrides.get("batch_size", cfg.batch_size), overrides.get("train_size", cfg.train_size)
    if batch > images:
        raise UsageError(f"--batch-size {batch} is more than the {images} training images; allowed: 1..{images}")
    return replace(cfg, **overrides)


def _cmd_train(args) -> dict:
    if args.model != "retinanet-r18":
        for flag in ("state_dir", "resume", "check_anchors"):
            if getattr(args, flag) not in (None, False):
                raise UsageError(f"--{flag.replace('_', '-')} is only for --model retinanet-r18, not {args.model}")
    if args.out_dir is not None and not Path(args.out_dir).is_dir():
        raise UsageError(f"--out-dir {args.out_dir!r} does not exist")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "yolo":
        cfg = _train_config(args, TrainConfig(seed=args.seed))
        _, hist = train(cfg, device=device, progress=args.progress, out_dir=args.out_dir or WEIGHTS_DIR)
        return {"model": "yolo", "map": hist["val"]["map"], "map50": hist["val"]["map50"], "seconds": hist["seconds"],
                "threads": torch.get_num_threads()}
    cfg = _train_config(args, RetinaTrainConfig(seed=args.seed))
    if args.check_anchors:
        data = ShapesDataset("train", cfg.train_size, seed=cfg.seed, image_size=cfg.model.image_size)
        out = {"model": "retinanet-r18", "train_images": cfg.train_size}
        for name, config in (("default", replace(cfg.model, anchor_sizes=DEFAULT_ANCHOR_SIZES)), ("ours", cfg.model)):
            r = anchor_recall(data, config)
            out[name] = {"anchor_sizes": config.anchor_sizes, "boxes": r["boxes"], "recall_iou50": r["recall"][0.5],
                         "recall_iou40": r["recall"][0.4], "mean_best_iou": r["mean_best_iou"],
                         "recall_iou50_by_size": {k: v["recall"][0.5] for k, v in r["by_size"].items()}}
        return out
    state_dir = Path(args.state_dir) if args.state_dir is not None else RETINA_STATE_DIR
    _, hist = train_retinanet(cfg, device=device, progress=args.progress, out_dir=args.out_dir or WEIGHTS_DIR,
                              state_dir=state_dir, resume=args.resume)
    return {"model": "retinanet-r18", "map": hist["val"]["map"], "map50": hist["val"]["map50"],
            "map_float16": hist["float16"]["map_float16"], "seconds": hist["seconds"], "threads": hist["threads"],
            "epochs": cfg.epochs, "steps": cfg.epochs * (cfg.train_size // cfg.batch_size), "state_dir": str(state_dir)}


def _cmd_evaluate(args) -> dict:
    device = resolve_device(args.device)
    if args.checkpoint is None:
        model = load_pretrained(args.model, device)
    else:
        model = load_any(args.checkpoint, device, args.model).model
    m = evaluate_model(model, ShapesDataset("val", args.val, seed=0), device=device, progress=args.progress)
    return {"model": args.model, "map": m["map"], "map50": m["map50"], "map75": m["map75"], "val_images": args.val,
            "checkpoint": args.checkpoint or "shipped"}


def _cmd_quantize(args) -> dict:
    if args.method not in METHODS:
        raise UsageError(f"--method {args.method!r} is not a method; allowed: {', '.join(METHODS)}")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed} must be >= 0")
    if args.p is not None and args.method.startswith("detptq"):
        raise UsageError(f"--p is not allowed with --method {args.method}: it chooses p per layer itself")
    if args.detptq_use is not None and args.method != "detptq-qdrop":
        raise UsageError(f"--detptq-use is only for --method detptq-qdrop, not {args.method}")
    for flag in ("odol_cls", "odol_loc", "rest"):
        if getattr(args, flag) is not None and not args.method.startswith("detptq"):
            raise UsageError(f"--{flag.replace('_', '-')} is only for --method detptq | detptq-qdrop (the methods that "
                             f"select p by ODOL), not {args.method}")
    if args.loss_norm is not None and args.method not in RECON_METHODS:
        raise UsageError(f"--loss-norm is only for --method {' | '.join(RECON_METHODS)} (the reconstruction "
                         f"methods), not {args.method}")
    for flag, methods in (("qdrop_input", ("qdrop", "detptq-qdrop")), ("act_iters", ("brecq",)), ("act_p", ("brecq",))):
        if getattr(args, flag) is not None and args.method not in methods:
            raise UsageError(f"--{flag.replace('_', '-')} is only for --method {' | '.join(methods)}, not {args.method}")
    if args.act_iters is not None and args.act_iters < 0:
        raise UsageError(f"--act-iters {args.act_iters} must be >= 0")
    if args.out is not None:
        _check_out_dir(args.out, "--out")
    if args.state is not None:
        _check_out_dir(args.state, "--state")
        if Path(args.state).exists() and not Path(args.state).is_file():
            raise UsageError(f"--state {args.state!r} exists and is not a file")
        if args.out is not None and Path(args.state).resolve() == Path(args.out).resolve():
            raise UsageError(f"--state {args.state!r} is the --out file: the run's progress is deleted when it "
                             "completes; give them different paths")
    if args.deploy and args.model != "yolo":
        raise UsageError(f"--deploy is only for --model yolo (its quantizers are those of the YOLO-style detector's "
                         f"fused int8 graph), not {args.model}")
    if args.deploy and (args.a_bits != 8 or args.w_bits not in (4, 8)):
        raise UsageError(f"--deploy needs --a-bits 8 and --w-bits 8 or 4 (the fused graph: W8A8 or W4A8); got "
                         f"--w-bits {args.w_bits} --a-bits {args.a_bits}")
    if args.batch_size is not None and args.batch_size > args.calib:
        raise UsageError(f"--batch-size {args.batch_size} is more than the --calib {args.calib} calibration images; "
                         f"allowed: 1..{args.calib}")
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_pretrained(args.model, device)
    calib = ShapesDataset("calib", args.calib, seed=args.seed)
    options = {"stem_8bit": not args.no_8bit_stem, "pred_8bit": not args.no_8bit_pred, "protocol": args.protocol}
    if args.deploy:
        options["deploy"] = True
    # flag (its argparse name) -> run_ptq option; the same name but for --loss-norm
    names = {name: name for name in ("p", "iters", "quant_prob", "batch_size", "lr_v", "lr_act", "odol_cls",
                                     "odol_loc", "qdrop_input", "act_iters", "act_p", "rest", "detptq_use")} | {"loss_norm": "recon_loss_norm"}
    for flag, option in names.items():
        if getattr(args, flag) is not None:
            options[option] = getattr(args, flag)
    try:
        res = run_ptq(model, calib, args.method, args.w_bits, args.a_bits, device=device, progress=args.progress,
                      state=args.state, **options)
    except ValueError as e:
        if args.state is not None and str(e).startswith("state="):  # another run's file: say it with the flag
            raise UsageError("--state " + str(e).removeprefix("state=")) from None
        if args.state is not None and str(e).startswith("resume"):  # a file of another version's reconstruction
            raise UsageError(f"--state {args.state!r} holds progress this version cannot resume ({e}); delete it "
                             "to start afresh") from None
        raise
    val = ShapesDataset("val", args.val, seed=0)
    m = evaluate_model(res.model, val, device=device, progress=args.progress)
    info = pretrained_info(args.model)
    if args.val == info["val_split"]["size"]:
        fp = {"map": info["val_map"], "map50": info["val_map50"]}  # measured on this very split when trained
    else:
        fp = evaluate_model(model, val, device=device)
    if args.out is not None:
        save_quantized(res, args.out, asdict(model.config), args.model)
    r = res.report
    ratio = m["map"] / fp["map"] if fp["map"] > 0 else None  # None: an FP model that finds nothing
    out = {"model": args.model, "method": r["method"], "w_bits": r["w_bits"], "a_bits": r["a_bits"], "map": m["map"],
           "map50": m["map50"], "fp_map": fp["map"], "fp_map50": fp["map50"], "ratio_to_fp": ratio,
           "calib_images": r["calib_images"], "calib_seed": args.seed, "val_images": args.val,
           "config": r["config"], "quant_config": r["quant_config"], "chosen_p": r["chosen_p"],
           "seconds": r["seconds"], "threads": torch.get_num_threads()}
    if "selection" in r:  # DetPTQ: the chosen p per item and the ODOL of every candidate (for the p's stability)
        out["selection"] = r["selection"]
    if "reconstruction" in r:  # per unit: p, loss before / after, flipped weights, seconds; and the time split
        out.update(reconstruction=r["reconstruction"], timings=r["timings"])
    if "resumed" in r:  # earlier runs of this one (--state): how many, and their wall and CPU seconds
        out["resumed"] = r["resumed"]
    if args.state is not None:
        Path(args.state).unlink(missing_ok=True)  # the run is complete: nothing to resume
    return out


def _cmd_benchmark(args) -> int:
    if args.quick and args.suite not in (None, "quick"):
        raise UsageError(f"--quick is --suite quick; it cannot be combined with --suite {args.suite}")
    suite = "quick" if args.quick else args.suite or "simple"
    if suite not in benchmark.SUITES:
        raise UsageError(f"--suite {suite!r} is not a suite; allowed: {', '.join(benchmark.SUITES)}")
    try:
        _, cells = benchmark.select_cells(suite, args.only, args.exclude, {"only": "--only", "exclude": "--exclude"},
                                          model=args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    resolve_device(args.device)
    default = f"{suite}.json" if args.model == "yolo" else f"{args.model}-{suite}.json"  # one file per model
    out = Path(args.out) if args.out is not None else Path("benchmarks") / "results" / default
    if args.out is not None and not out.parent.is_dir():
        raise UsageError(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
    for path in args.reuse or []:
        if not Path(path).is_file():
            raise UsageError(f"--reuse {path!r} does not exist; it must be the result JSON of another run")
        if Path(path).resolve() == out.resolve():
            raise UsageError(f"--reuse {path!r} is the --out file itself")
        benchmark.load_results(path, "--reuse")
    if args.list:
        done = (benchmark.load_results(out) or {"cells": {}})["cells"]
        status = [done[c.key]["status"] if c.key in done else "todo" for c in cells]
        for c, st in zip(cells, status):
            print(f"{c.key}\t{st}")
        total = len(benchmark.SUITES[suite])
        what = f"{len(cells)} of {total} cells" if len(cells) < total else f"{len(cells)} cells"
        print(f"suite {suite}: {what}, {status.count('ok')} ok, {status.count('failed')} failed, "
              f"{status.count('todo')} todo")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)  # only reached for the default out (a custom one must exist)
    command = ["detptq-mini", "benchmark", "--suite", suite]
    flags = [("--out", args.out)] + [("--only", v) for v in args.only or []] + \
        [("--exclude", v) for v in args.exclude or []]
    for flag, value in flags:
        if value is not None:  # --flag=value when the value starts with a dash, so that the logged command re-runs
            command += [f"{flag}={value}"] if value.startswith("-") else [flag, value]
    for path in args.reuse or []:
        command += ["--reuse", path]
    if args.model != "yolo":
        command += ["--model", args.model]
    if args.device != "cpu":
        command += ["--device", args.device]
    if args.jobs != 1:
        command += ["--jobs", str(args.jobs)]
    if args.stop_after is not None:
        command += ["--stop-after", f"{args.stop_after:g}"]
    run = benchmark.run_suite(suite, out, progress=args.progress, only=args.only, device=args.device,
                              reuse=args.reuse or (), command=shlex.join(command), exclude=args.exclude,
                              jobs=args.jobs, stop_after=args.stop_after, model=args.model)
    for key in run.failed:
        print(f"detptq-mini: cell {key} failed: {run.results['cells'][key].get('error', '')}", file=sys.stderr)
    print(run.summary())
    return 0 if run.ok else 1


def _cmd_export(args) -> dict:
    if args.model != "yolo":
        raise UsageError(f"--model {args.model}: export writes the YOLO-style detector's int8 ONNX graph only; "
                         "allowed: yolo")
    _check_out_dir(args.onnx, "--onnx")
    if not args.onnx.endswith(".onnx"):
        raise UsageError(f"--onnx {args.onnx!r} must end in .onnx")
    device = resolve_device(args.device)
    qmodel, kind, report = load_any(args.checkpoint, "cpu", args.model)
    if kind != "quantized":
        raise UsageError(f"--checkpoint {args.checkpoint!r} holds an FP model; export needs a W8A8 checkpoint "
                         "from `detptq-mini quantize --w-bits 8 --a-bits 8 --deploy --out PATH`")
    try:
        check_exportable(qmodel)
        export_onnx(qmodel, args.onnx, dynamo=args.dynamo, argument="--onnx", graph=args.graph,
                    weights=args.weights)
    except ValueError as e:
        message = str(e).replace("graph=", "--graph ").replace("weights=", "--weights ")
        raise UsageError(f"--checkpoint {args.checkpoint!r}: {message}") from None
    summary = qdq_summary(args.onnx)
    kernels = optimized_graph(args.onnx, args.threads)
    out = {"onnx": args.onnx, "checkpoint": args.checkpoint, "method": report.get("method"), "graph": args.graph,
           "opset": summary["opset"], "convs": summary["convs"], "qdq_convs": summary["qdq_convs"],
           "per_channel_weight_convs": summary["per_channel_weight_convs"],
           "quantize_linear": summary["nodes"].get("QuantizeLinear", 0),
           "dequantize_linear": summary["nodes"].get("DequantizeLinear", 0),
           "integer_convs": kernels["integer_convs"], "float_convs": kernels["float_convs"],
           "all_convs_integer": kernels["integer_convs"] == summary["convs"] and kernels["float_convs"] == 0}
    session = onnx_session(args.onnx, args.threads)
    val = ShapesDataset("val", args.val, seed=0) if args.val > 0 else None
    if val is not None:
        qmodel = qmodel.to(device)
        images = val.images()
        layers = check_layers(qmodel, images[:8], args.threads)
        cmp = compare_outputs(qmodel, session, images)
        m_fq = evaluate_model(qmodel, val, device=device)
        m_ort = evaluate_model(OnnxDetector(session), val)
        out.update(val_images=args.val, map_fake_quant=m_fq["map"], map_onnx=m_ort["map"],
                   map_diff=m_ort["map"] - m_fq["map"], map50_fake_quant=m_fq["map50"], map50_onnx=m_ort["map50"],
                   layer_max_steps=layers["max_steps"], layer_worst=layers["worst_layer"],
                   layers_within_step=layers["within_step"],
                   output_max_steps=max((v["max_steps"] for v in cmp.values() if v["max_steps"] is not None),
                                        default=None),  # None: every prediction conv is FP (protocol head-fp)
                   output_max_abs_diff=max(v["max_abs"] for v in cmp.values()),
                   output_mean_abs_diff=max(v["mean_abs"] for v in cmp.values()))
    if args.benchmark and args.graph == "fused":
        # the peer calibrates on the checkpoint's own calibration images (quantize's --calib and --seed)
        seed = (report.get("config") or {}).get("seed", 0)
        calib = ShapesDataset("calib", int(report.get("calib_images") or 256), seed=int(seed)).images()
        cmp_all = compare_graphs(qmodel.cpu(), calib, val or ShapesDataset("val", 100, seed=0),
                                 fused_path=args.onnx, threads=args.threads, rounds=args.rounds)
        out.update(benchmark=cmp_all, threads=args.threads,
                   latency_fp32_ms=cmp_all["latency_ms"]["b1"]["fp32"],
                   latency_fused_ms=cmp_all["latency_ms"]["b1"]["fused"],
                   latency_ratio_fused_to_fp32=cmp_all["ratio_to_fp32"]["b1"]["fused"],
                   latency_ratio_fused_to_peer=cmp_all["ratio_fused_to_peer"]["b1"])
    elif args.benchmark:
        with tempfile.TemporaryDirectory() as tmp:
            fp_path = export_onnx(to_float(qmodel.cpu()), f"{tmp}/fp32.onnx")
            fp = latency_per_image(onnx_session(fp_path, args.threads))
        qdq = latency_per_image(session)
        out.update(threads=args.threads, latency_fp32_ms=fp["median_ms"], latency_qdq_ms=qdq["median_ms"],
                   latency_ratio_qdq_to_fp32=qdq["median_ms"] / fp["median_ms"])
    return out


_COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "quantize": _cmd_quantize, "benchmark": _cmd_benchmark,
             "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader of our output went away (`detptq-mini benchmark --list | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not raise again
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result = _COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"detptq-mini: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency (onnx, onnxruntime for `export`)
        print(f"detptq-mini: error: {e}; install the optional dependencies: pip install -e '.[export]'",
              file=sys.stderr)
        return 2
    if isinstance(result, int):  # a command that printed its own output (benchmark): its exit status
        return result
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
