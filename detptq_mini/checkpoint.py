"""Every checkpoint read and write of detptq-mini, FP and quantized, in one place.

A checkpoint is a ``torch.save`` of a dict, written atomically (a temporary file beside the target, then a rename:
a failed save leaves no partial file and an existing file untouched). Every file starts with a header::

    {"header": {"format": 1, "kind": "fp" | "quantized"},
     "state_dict": ..., "config": ..., ...}

* an **FP** checkpoint (:func:`save_checkpoint`; the shipped ``weights/detector.pt``) adds ``"meta"`` (how it was
  trained);
* a **quantized** checkpoint (:func:`save_quantized`) adds ``"quant"`` (the PTQ config, the quantization config,
  the chosen p) and ``"report"`` (the report of the run). The quantization config holds the layer protocol
  (``"protocol"``: ``"ours"`` or ``"head-fp"``, whose head convs are stored as FP convs); a file written before the
  protocol existed has none and loads as ``"ours"``, which it is. With ``"deploy": true`` (``quantize --deploy``) the
  state dict also holds the deploy quantizers (each conv's output, each SiLU's sigmoid) of the fused int8 graph,
  calibrated by ``quantize``; they load switched on. A file without the key has none, as it was written.

The header names the model (``"model"``: one of :data:`MODELS`, ``"yolo"`` the shipped YOLO-style detector,
``"retinanet-r18"`` torchvision's RetinaNet-ResNet18-FPN through :func:`~detptq_mini.adapter.retinanet_r18_detector`);
a file written before it existed has none and is ``"yolo"``, which it is. Every reader that is told which model to
expect (``model=``, the command line's ``--model``) refuses a file of the other, naming both.
``config`` is the FP detector's :class:`~detptq_mini.model.DetectorConfig` (``yolo``) or
:class:`~detptq_mini.adapter.RetinaNetConfig` (``retinanet-r18``) as a dict. A checkpoint written in float16
(:func:`ship_float16`, the shipped RetinaNet) says so in its header (``"dtype": "float16"``); it loads into the
float32 model. ``format`` is the version of
this layout: a reader refuses a file without it, or with a version it does not know (:data:`READ_FORMATS`), with a
ValueError that says what to re-run. The header is a dict so that later releases can describe more of the model in it
(the model, the dtype) without a new format version: a key a reader does not know is ignored,
and a missing one means today's detector.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .adapter import RetinaNetAdapter, RetinaNetConfig, retinanet_r18_detector
from .checks import check_choice
from .data import ShapesDataset
from .evaluate import evaluate_model
from .model import Detector, DetectorConfig
from .quant import QuantConfig, deploy_quantizers, quant_layers, quantize_model
from .utils import atomic_torch_save

if TYPE_CHECKING:  # an annotation only: reading and writing checkpoints needs none of the PTQ machinery
    from .pipeline import PTQResult

__all__ = [
    "WEIGHTS_DIR", "FORMAT_VERSION", "READ_FORMATS", "KINDS", "Loaded", "checkpoint_header", "read_checkpoint",
    "check_state_dict", "detector_from_config", "detector_from_checkpoint", "quantized_from_checkpoint",
    "save_checkpoint", "load_checkpoint", "save_quantized", "load_quantized", "load_any", "load_pretrained",
    "pretrained_info", "MODELS", "PRETRAINED_FILES", "check_model", "checkpoint_model", "model_name", "ship_float16",
    "pretrained_path",
]

#: The directory of the shipped FP weights, ``<name>.pt`` and its metadata ``<name>.json`` for each model
#: (:data:`PRETRAINED_FILES`), next to this module.
#:
#: :meta hide-value:
WEIGHTS_DIR = Path(__file__).with_name("weights")
FORMAT_VERSION = 1  #: The format version every checkpoint is written in (the header's ``"format"``).
READ_FORMATS: tuple[int, ...] = (1,)  #: The format versions this release reads.
#: The kinds of checkpoint (the header's ``"kind"``), an FP detector or a quantized one.
KINDS: tuple[str, ...] = ("fp", "quantized")
#: The detectors a checkpoint can hold (``--model``), the shipped YOLO-style detector and RetinaNet-ResNet18-FPN.
MODELS: tuple[str, ...] = ("yolo", "retinanet-r18")
#: The shipped weights of each model in :data:`WEIGHTS_DIR` (``<name>.pt`` and its metadata ``<name>.json``).
PRETRAINED_FILES: dict[str, str] = {"yolo": "detector", "retinanet-r18": "retinanet-r18"}
#: How to make each model's shipped weights when they are missing.
_MAKE = {"yolo": "`make weights` (detptq-mini train)",
         "retinanet-r18": "`make weights-retinanet` (detptq-mini train --model retinanet-r18, about 90 minutes on 2 "
                          "cores)"}


def check_model(model, argument: str = "model") -> str:
    """``model`` if it is one of :data:`MODELS`, else a ValueError naming ``argument`` and the allowed names."""
    return check_choice(argument, model, MODELS)


def model_name(model: nn.Module) -> str:
    """The :data:`MODELS` name of a detector (FP or quantized): ``"retinanet-r18"`` for a
    :class:`~detptq_mini.adapter.RetinaNetAdapter` built with a :class:`~detptq_mini.adapter.RetinaNetConfig`,
    ``"yolo"`` for a :class:`~detptq_mini.model.Detector`; else a ValueError (a checkpoint cannot rebuild it)."""
    if isinstance(model, RetinaNetAdapter) and isinstance(model.config, RetinaNetConfig):
        return "retinanet-r18"
    if isinstance(model, Detector):
        return "yolo"
    raise ValueError(f"model is a {type(model).__name__}; a detptq-mini checkpoint holds one of {', '.join(MODELS)} "
                     "(a Detector, or a RetinaNetAdapter made by retinanet_r18_detector)")


def checkpoint_model(ckpt: dict, what: str = "checkpoint", expected: str | None = None) -> str:
    """The model a checkpoint dict holds (its header's ``"model"``; none: ``"yolo"``).

    With ``expected`` (a :data:`MODELS` name), a checkpoint of another model is a ValueError naming both.
    """
    found = ckpt.get("header", {}).get("model", "yolo")
    if found not in MODELS:
        raise ValueError(f"{what} holds model={found!r}, which this release cannot build; allowed: "
                         f"{', '.join(map(repr, MODELS))}")
    if expected is not None and check_model(expected) != found:
        raise ValueError(f"{what} holds model {found!r}, not {expected!r}: it does not load into {expected!r}; pass "
                         f"--model {found} (model={found!r}); allowed: {', '.join(MODELS)}")
    return found


class Loaded(NamedTuple):
    """A model read by :func:`load_any`: the model (eval mode), its kind and its report.

    ``report`` is the PTQ report of a quantized checkpoint, the ``meta`` (training metadata) of an FP one.
    """

    model: nn.Module
    kind: str
    report: dict


def checkpoint_header(kind: str, model: str = "yolo", dtype: str = "float32") -> dict:
    """The header written at the top of every checkpoint: ``{"format": FORMAT_VERSION, "kind": kind, "model": model}``
    (and ``"dtype": "float16"`` for a float16 file)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a checkpoint kind; allowed: {', '.join(map(repr, KINDS))}")
    header = {"format": FORMAT_VERSION, "kind": kind, "model": check_model(model)}
    if check_choice("dtype", dtype, ("float32", "float16")) != "float32":
        header["dtype"] = dtype
    return header


def _check_header(ckpt: dict, what: str) -> str:
    """The kind of a checkpoint dict whose header has a format this release reads (else a ValueError)."""
    header = ckpt.get("header")
    version = header.get("format") if isinstance(header, dict) else None
    if isinstance(version, bool) or version not in READ_FORMATS:
        found = "none (written before checkpoints had a format version)" if version is None else repr(version)
        raise ValueError(f"{what} has format version {found}; this release of detptq-mini reads format version(s) "
                         f"{', '.join(map(str, READ_FORMATS))}; re-create it: `detptq-mini train --out-dir DIR` for an "
                         "FP model, `detptq-mini quantize ... --out PATH` for a quantized one")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{what} has kind={kind!r} in its header; allowed: {', '.join(map(repr, KINDS))}")
    return kind


def read_checkpoint(path, device: str | torch.device = "cpu", model: str | None = None) -> dict:
    """The raw dict of a detptq-mini checkpoint (FP or quantized), its header checked.

    Errors (ValueError, naming the file): it is missing; it is not a detptq-mini checkpoint; its format version is
    missing, old or unknown (:data:`READ_FORMATS` are read), or its kind is not one of :data:`KINDS`; its model is
    unknown, or (with ``model``) not ``model``.
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint={str(path)!r} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not a checkpoint"
        raise ValueError(f"checkpoint={str(path)!r} is not a detptq-mini checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint={str(path)!r} is not a detptq-mini checkpoint (needs 'state_dict' and 'config')")
    _check_header(ckpt, f"checkpoint {str(path)!r}")
    checkpoint_model(ckpt, f"checkpoint {str(path)!r}", model)
    return ckpt


def check_state_dict(model: nn.Module, state: dict, what: str = "state_dict") -> None:
    """Raise a ValueError naming missing, unexpected or mis-shaped tensors when ``state`` does not fit ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {shapes[0]})")
        raise ValueError(f"{what} does not fit this model's architecture: " + "; ".join(parts))


def detector_from_config(config: dict, what: str = "checkpoint", model: str = "yolo") -> nn.Module:
    """A fresh detector of ``model`` (:data:`MODELS`) from a checkpoint's config dict (lists become tuples): a
    :class:`~detptq_mini.model.Detector` for ``"yolo"``, a frozen-BN
    :func:`~detptq_mini.adapter.retinanet_r18_detector` for ``"retinanet-r18"``."""
    cfg = dict(config)
    try:
        if check_model(model) == "retinanet-r18":
            if "anchor_sizes" in cfg:
                cfg["anchor_sizes"] = tuple(tuple(level) for level in cfg["anchor_sizes"])
            if "aspect_ratios" in cfg:
                cfg["aspect_ratios"] = tuple(cfg["aspect_ratios"])
            return retinanet_r18_detector(RetinaNetConfig(**cfg))
        for key in ("widths", "depths"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        return Detector(DetectorConfig(**cfg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} has a config this version cannot build: {e}") from None


def detector_from_checkpoint(ckpt: dict, what: str = "checkpoint") -> nn.Module:
    """The FP detector (eval mode) of a checkpoint dict read by :func:`read_checkpoint`; ``what`` names it in errors."""
    model = detector_from_config(ckpt["config"], what, checkpoint_model(ckpt, what))
    check_state_dict(model, ckpt["state_dict"], what)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def quantized_from_checkpoint(ckpt: dict, what: str = "checkpoint",
                              device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """:func:`load_quantized` of a checkpoint dict already read by :func:`read_checkpoint`."""
    quant = ckpt.get("quant")
    if not isinstance(quant, dict) or not isinstance(quant.get("quant_config"), dict):
        raise ValueError(f"{what} is not a quantized detptq-mini checkpoint (no quantization config); "
                         "an FP checkpoint loads with detptq_mini.checkpoint.load_checkpoint")
    try:
        qc = QuantConfig(**quant["quant_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} has a quantization config this version cannot build: {e}") from None
    fp = detector_from_config(ckpt["config"], what, checkpoint_model(ckpt, what)).eval()
    qmodel = quantize_model(fp, qc)
    check_state_dict(qmodel, ckpt["state_dict"], what)
    qmodel.load_state_dict(ckpt["state_dict"])
    report = ckpt.get("report") or {}
    saved = report.get("layers") or {}
    for name, layer in quant_layers(qmodel).items():
        bits = {"w_bits": layer.weight_quantizer.bits, "a_bits": layer.input_quantizer.bits}
        if name in saved and saved[name] != bits:
            raise ValueError(f"{what}: layer {name!r} was saved at {saved[name]} but its quantization config "
                             f"{qc.to_dict()} gives {bits}; the checkpoint's config and parameters do not match")
        for kind, q in (("weight", layer.weight_quantizer), ("input", layer.input_quantizer)):
            ok = bool(q.calibrated) and bool((torch.isfinite(q.scale) & (q.scale > 0)).all()) and bool(
                ((q.zero_point >= q.qmin) & (q.zero_point <= q.qmax)).all())
            if not ok:
                raise ValueError(f"{what}: layer {name!r} has no valid {kind} quantization parameters (scale finite "
                                 f"and > 0, zero point in {q.qmin}..{q.qmax}); it was not written by save_quantized")
    for name, q in deploy_quantizers(qmodel).items():  # saved calibrated by run_ptq(deploy=True): switch them on
        if not bool(q.calibrated):
            raise ValueError(f"{what}: deploy quantizer {name!r} has no scale; its quantization config has "
                             "deploy=True, so it was not written by save_quantized; re-run `quantize --deploy --out`")
        q.enabled = True
    return qmodel.to(device).eval(), report


# ------------------------------------------------------------------ FP
def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict | None = None,
                    dtype: str = "float32") -> None:
    """Write an FP checkpoint ``{"header", "state_dict", "config", "meta"}`` atomically.

    Args:
        model: the FP detector: a :class:`~detptq_mini.model.Detector` or a
            :func:`~detptq_mini.adapter.retinanet_r18_detector` (its name, :func:`model_name`, goes in the header).
        path: the file to write; its directory must exist (else a ValueError naming ``path``).
        meta: how the weights were made (training config, seed, val mAP...); stored as given.
        dtype: ``"float32"`` (default) or ``"float16"``: every floating tensor stored in half precision (half the
            file; check the mAP with :func:`ship_float16`, which writes through here).
    """
    state = model.state_dict()
    if check_choice("dtype", dtype, ("float32", "float16")) == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_torch_save({"header": checkpoint_header("fp", model_name(model), dtype), "state_dict": state,
                       "config": asdict(model.config), "meta": meta or {}}, path)


def ship_float16(model: nn.Module, path: str | os.PathLike, meta: dict | None = None,
                 val: ShapesDataset | None = None, tol: float = 1e-3, device: str | torch.device = "cpu") -> dict:
    """Write ``model`` as a float16 FP checkpoint, once its float16 weights are checked to keep the FP mAP.

    The float16 model (every floating tensor of the state dict rounded to float16, loaded back into float32: what
    :func:`load_checkpoint` gives from the file) is evaluated on ``val`` beside ``model``; if the mAP50:95 or the mAP50
    moves by more than ``tol``, nothing is written and a ValueError says by how much.

    Args:
        model: the FP detector (float32).
        path: the file (its directory must exist).
        meta: stored in the checkpoint, with the check's figures under ``"float16"``.
        val: the images of the check (default: the 500 val images, seed 0).
        tol: the largest change allowed in mAP50:95 and mAP50 (default 0.001).
        device: where the models are evaluated.

    Returns:
        ``{"map_float32", "map_float16", "map50_float32", "map50_float16", "max_abs_diff", "val_images", "tol"}``.
    """
    val = ShapesDataset("val", 500, seed=0) if val is None else val
    half = copy.deepcopy(model)
    half.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    m32 = evaluate_model(model, val, device=device)
    m16 = evaluate_model(half, val, device=device)
    diff = max(abs(m16["map"] - m32["map"]), abs(m16["map50"] - m32["map50"]))
    check = {"map_float32": m32["map"], "map_float16": m16["map"], "map50_float32": m32["map50"],
             "map50_float16": m16["map50"], "max_abs_diff": diff, "val_images": len(val), "tol": tol}
    if not diff <= tol:
        raise ValueError(f"float16 weights change the FP mAP by {diff:.4g} > tol={tol} (float32 mAP "
                         f"{m32['map']:.4f}, float16 {m16['map']:.4f}); {str(path)!r} is not written")
    save_checkpoint(model, path, {**(meta or {}), "float16": check}, dtype="float16")
    return check


def load_checkpoint(path, device: str | torch.device = "cpu", model: str | None = None) -> nn.Module:
    """Load an FP detector written by :func:`save_checkpoint`; eval mode, on ``device``.

    A file that is not such a checkpoint (or a quantized one), of a format this release does not read, of another
    model than ``model`` (when given), or weights that do not fit the architecture give a ValueError that names the
    problem.
    """
    ckpt = read_checkpoint(path, device, model)
    what = f"checkpoint {str(path)!r}"
    if ckpt["header"]["kind"] == "quantized":
        raise ValueError(f"checkpoint={str(path)!r} holds a quantized model; load it with "
                         "detptq_mini.checkpoint.load_quantized")
    return detector_from_checkpoint(ckpt, what).to(device).eval()


def pretrained_path(name: str = "yolo") -> Path:
    """The shipped weights of model ``name`` (:data:`MODELS`) in the package; they may not exist yet."""
    if isinstance(name, (str, torch.device)) and str(name).split(":")[0] in ("cpu", "cuda", "mps"):
        raise ValueError(f"name={str(name)!r} is not a model; allowed: {', '.join(map(repr, MODELS))} (the device "
                         "is the keyword argument device=...)")
    return WEIGHTS_DIR / f"{PRETRAINED_FILES[check_model(name, 'name')]}.pt"


def load_pretrained(name: str = "yolo", device: str | torch.device = "cpu") -> nn.Module:
    """A shipped FP detector, in eval mode on ``device``; no network.

    Args:
        name: ``"yolo"`` (default: the YOLO-style detector, ``detptq-mini train``) or ``"retinanet-r18"``
            (RetinaNet-ResNet18-FPN, ``detptq-mini train --model retinanet-r18``, shipped in float16); another name
            is a ValueError naming the allowed ones.
        device: where it goes.

    Raises:
        FileNotFoundError: the weights are not in the package yet; the message says how to make them.
    """
    path = pretrained_path(name)
    if not path.exists():
        raise FileNotFoundError(f"the shipped weights of {name!r} are not in this package ({path}); make them with "
                                f"{_MAKE[name]}")
    return load_checkpoint(path, device, name)


def pretrained_info(name: str = "yolo") -> dict:
    """Metadata of a model's shipped weights (training config, seed, val mAP, the command that made them)."""
    path = pretrained_path(name).with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"the shipped weights of {name!r} are not in this package ({path}); make them with "
                                f"{_MAKE[name]}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ quantized
def save_quantized(result: PTQResult, path, fp_config: dict, model: str = "yolo") -> None:
    """Write the quantized model of a :func:`~detptq_mini.pipeline.run_ptq` result atomically.

    The file holds the header, the weights and quantization parameters, the FP detector's config, the PTQ and
    quantization configs, the chosen p and the run's report (all but its ``seconds``).

    Args:
        result: the :class:`~detptq_mini.pipeline.PTQResult`.
        path: the file to write; its directory must exist (else a ValueError naming ``out``).
        fp_config: the FP detector's config as a dict (``dict(model.config.__dict__)``).
        model: the FP detector's name (:data:`MODELS`), written in the header.
    """
    payload = {"header": checkpoint_header("quantized", model), "state_dict": result.model.state_dict(),
               "config": fp_config,
               "quant": {"ptq_config": result.report["config"], "quant_config": result.report["quant_config"],
                         "chosen_p": result.report["chosen_p"]},
               "report": {k: v for k, v in result.report.items() if k != "seconds"}}
    atomic_torch_save(payload, path, "out")


def load_quantized(path, device: str | torch.device = "cpu", model: str | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_quantized`; returns the quantized model and its report.

    Errors (ValueError, naming ``checkpoint``): the file is missing or not a checkpoint; its format version is
    missing, old or unknown; it holds an FP model; its weights do not fit the architecture its config describes
    (another architecture); its quantization config cannot be built, or gives other bit widths than the ones it was
    saved with, or a quantizer has no valid scale (another quantization config); it holds another model than
    ``model`` (when given).
    """
    return quantized_from_checkpoint(read_checkpoint(path, device, model), f"checkpoint {str(path)!r}", device)


def load_any(path, device: str | torch.device = "cpu", model: str | None = None) -> Loaded:
    """The model of any detptq-mini checkpoint, FP or quantized (the file is read once), in eval mode on ``device``.

    Returns:
        a :class:`Loaded`: ``model``, ``kind`` (``"fp"`` or ``"quantized"``, from the header) and ``report``.
        Errors are those of :func:`load_checkpoint` and :func:`load_quantized` (with ``model``, a checkpoint of
        another model is refused).
    """
    ckpt = read_checkpoint(path, device, model)
    what = f"checkpoint {str(path)!r}"
    if ckpt["header"]["kind"] == "quantized":
        model, report = quantized_from_checkpoint(ckpt, what, device)
        return Loaded(model, "quantized", report)
    return Loaded(detector_from_checkpoint(ckpt, what).to(device).eval(), "fp", ckpt.get("meta") or {})
