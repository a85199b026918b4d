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

``config`` is the FP detector's :class:`~detptq_mini.model.DetectorConfig` as a dict. ``format`` is the version of
this layout: a reader refuses a file without it, or with a version it does not know (:data:`READ_FORMATS`), with a
ValueError that says what to re-run. The header is a dict so that later releases can describe more of the model in it
(e.g. ``"model": "yolo"``, the layer protocol) without a new format version: a key a reader does not know is ignored,
and a missing one means today's detector.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .model import Detector, DetectorConfig
from .quant import QuantConfig, deploy_quantizers, quant_layers, quantize_model
from .utils import atomic_torch_save

if TYPE_CHECKING:  # an annotation only: reading and writing checkpoints needs none of the PTQ machinery
    from .pipeline import PTQResult

__all__ = [
    "WEIGHTS_DIR", "FORMAT_VERSION", "READ_FORMATS", "KINDS", "Loaded", "checkpoint_header", "read_checkpoint",
    "check_state_dict", "detector_from_config", "detector_from_checkpoint", "quantized_from_checkpoint",
    "save_checkpoint", "load_checkpoint", "save_quantized", "load_quantized", "load_any", "load_pretrained",
    "pretrained_info",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")  # the shipped FP checkpoint detector.pt and its detector.json
FORMAT_VERSION = 1  # the format every checkpoint is written in
READ_FORMATS: tuple[int, ...] = (1,)  # the formats this release reads
KINDS: tuple[str, ...] = ("fp", "quantized")


class Loaded(NamedTuple):
    """A model read by :func:`load_any`: the model (eval mode), its kind and its report.

    ``report`` is the PTQ report of a quantized checkpoint, the ``meta`` (training metadata) of an FP one.
    """

    model: nn.Module
    kind: str
    report: dict


def checkpoint_header(kind: str) -> dict:
    """The header written at the top of every checkpoint: ``{"format": FORMAT_VERSION, "kind": kind}``."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a checkpoint kind; allowed: {', '.join(map(repr, KINDS))}")
    return {"format": FORMAT_VERSION, "kind": kind}


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


def read_checkpoint(path, device: str | torch.device = "cpu") -> dict:
    """The raw dict of a detptq-mini checkpoint (FP or quantized), its header checked.

    Errors (ValueError, naming the file): it is missing; it is not a detptq-mini checkpoint; its format version is
    missing, old or unknown (:data:`READ_FORMATS` are read), or its kind is not one of :data:`KINDS`.
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


def detector_from_config(config: dict, what: str = "checkpoint") -> Detector:
    """A fresh :class:`~detptq_mini.model.Detector` from a checkpoint's config dict (lists become tuples)."""
    cfg = dict(config)
    for key in ("widths", "depths"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    try:
        return Detector(DetectorConfig(**cfg))
    except TypeError as e:
        raise ValueError(f"{what} has a config this version cannot build: {e}") from None


def detector_from_checkpoint(ckpt: dict, what: str = "checkpoint") -> Detector:
    """The FP detector (eval mode) of a checkpoint dict read by :func:`read_checkpoint`; ``what`` names it in errors."""
    model = detector_from_config(ckpt["config"], what)
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
    qmodel = quantize_model(detector_from_config(ckpt["config"], what).eval(), qc)
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
def save_checkpoint(model: Detector, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write an FP checkpoint ``{"header", "state_dict", "config", "meta"}`` atomically.

    Args:
        model: the FP detector.
        path: the file to write; its directory must exist (else a ValueError naming ``path``).
        meta: how the weights were made (training config, seed, val mAP...); stored as given.
    """
    atomic_torch_save({"header": checkpoint_header("fp"), "state_dict": model.state_dict(),
                       "config": asdict(model.config), "meta": meta or {}}, path)


def load_checkpoint(path, device: str | torch.device = "cpu") -> Detector:
    """Load an FP detector written by :func:`save_checkpoint`; eval mode, on ``device``.

    A file that is not such a checkpoint (or a quantized one), of a format this release does not read, or weights
    that do not fit the architecture give a ValueError that names the problem.
    """
    ckpt = read_checkpoint(path, device)
    what = f"checkpoint {str(path)!r}"
    if ckpt["header"]["kind"] == "quantized":
        raise ValueError(f"checkpoint={str(path)!r} holds a quantized model; load it with "
                         "detptq_mini.checkpoint.load_quantized")
    return detector_from_checkpoint(ckpt, what).to(device).eval()


def load_pretrained(device: str | torch.device = "cpu") -> Detector:
    """The shipped FP detector (trained by ``detptq-mini train``), in eval mode on ``device``."""
    path = WEIGHTS_DIR / "detector.pt"
    if not path.exists():
        raise FileNotFoundError(f"shipped weights missing at {path}; reinstall the package or run `detptq-mini train`")
    return load_checkpoint(path, device)


def pretrained_info() -> dict:
    """Metadata of the shipped weights (training config, seed, val mAP, the command that made them)."""
    return json.loads((WEIGHTS_DIR / "detector.json").read_text())


# ------------------------------------------------------------------ quantized
def save_quantized(result: PTQResult, path, fp_config: dict) -> None:
    """Write the quantized model of a :func:`~detptq_mini.pipeline.run_ptq` result atomically.

    The file holds the header, the weights and quantization parameters, the FP detector's config, the PTQ and
    quantization configs, the chosen p and the run's report (all but its ``seconds``).

    Args:
        result: the :class:`~detptq_mini.pipeline.PTQResult`.
        path: the file to write; its directory must exist (else a ValueError naming ``out``).
        fp_config: the FP detector's config as a dict (``dict(model.config.__dict__)``).
    """
    payload = {"header": checkpoint_header("quantized"), "state_dict": result.model.state_dict(), "config": fp_config,
               "quant": {"ptq_config": result.report["config"], "quant_config": result.report["quant_config"],
                         "chosen_p": result.report["chosen_p"]},
               "report": {k: v for k, v in result.report.items() if k != "seconds"}}
    atomic_torch_save(payload, path, "out")


def load_quantized(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_quantized`; returns the quantized model and its report.

    Errors (ValueError, naming ``checkpoint``): the file is missing or not a checkpoint; its format version is
    missing, old or unknown; it holds an FP model; its weights do not fit the architecture its config describes
    (another architecture); its quantization config cannot be built, or gives other bit widths than the ones it was
    saved with, or a quantizer has no valid scale (another quantization config).
    """
    return quantized_from_checkpoint(read_checkpoint(path, device), f"checkpoint {str(path)!r}", device)


def load_any(path, device: str | torch.device = "cpu") -> Loaded:
    """The model of any detptq-mini checkpoint, FP or quantized (the file is read once), in eval mode on ``device``.

    Returns:
        a :class:`Loaded`: ``model``, ``kind`` (``"fp"`` or ``"quantized"``, from the header) and ``report``.
        Errors are those of :func:`load_checkpoint` and :func:`load_quantized`.
    """
    ckpt = read_checkpoint(path, device)
    what = f"checkpoint {str(path)!r}"
    if ckpt["header"]["kind"] == "quantized":
        model, report = quantized_from_checkpoint(ckpt, what, device)
        return Loaded(model, "quantized", report)
    return Loaded(detector_from_checkpoint(ckpt, what).to(device).eval(), "fp", ckpt.get("meta") or {})
