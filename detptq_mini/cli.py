"""The ``detptq-mini`` command line: ``train``, ``evaluate`` (and, as they land, ``quantize``, ``benchmark``, ``export``).

Exit status 0 on success; 2 on bad usage or bad input, with a one-line error on stderr and no traceback.
Every command takes ``--device`` (``cpu`` by default).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention, without the usage dump)
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="detptq-mini", description="Task-loss-guided PTQ (DetPTQ) of a small YOLO-style detector.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="retrain the FP detector (the shipped weights come from this command)")
    t.add_argument("--out-dir", default=None, help="where to write detector.pt/.json (default: the package's weights/)")
    t.add_argument("--epochs", type=_positive_int, default=None, help="override the number of epochs (default: as shipped)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--progress", action="store_true", help="show a progress bar")
    t.add_argument("--device", default="cpu")

    e = sub.add_parser("evaluate", help="COCO mAP on the 500-image val split (seed 0)")
    e.add_argument("--checkpoint", default=None, help="a checkpoint (default: the shipped FP model)")
    e.add_argument("--val", type=_positive_int, default=500, help="number of val images")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--progress", action="store_true")
    e.add_argument("--device", default="cpu")
    return p


def _cmd_train(args) -> dict:
    from dataclasses import replace

    from .model import WEIGHTS_DIR
    from .train import TrainConfig, train
    from .utils import resolve_device

    cfg = TrainConfig(seed=args.seed)
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    _, hist = train(cfg, device=resolve_device(args.device), progress=args.progress,
                    out_dir=args.out_dir or WEIGHTS_DIR)
    return {"map": hist["val"]["map"], "map50": hist["val"]["map50"], "seconds": hist["seconds"]}


def _load_any(checkpoint: str | None, device):
    from .model import load_checkpoint, load_pretrained

    if checkpoint is None:
        return load_pretrained(device)
    return load_checkpoint(checkpoint, device)


def _cmd_evaluate(args) -> dict:
    from .data import ShapesDataset
    from .evaluate import evaluate_model
    from .utils import resolve_device

    device = resolve_device(args.device)
    model = _load_any(args.checkpoint, device)
    m = evaluate_model(model, ShapesDataset("val", args.val, seed=0), device=device, progress=args.progress)
    return {"map": m["map"], "map50": m["map50"], "map75": m["map75"], "val_images": args.val,
            "checkpoint": args.checkpoint or "shipped"}


_COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result = _COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"detptq-mini: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
