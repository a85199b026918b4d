"""``run_ptq``: every PTQ method through one path, with a validated, frozen config and a report.

Methods available now:

* ``"minmax"``: round-to-nearest with min-max ranges (weights per output channel, activations per tensor);
* ``"lp"``: the Lp scale search of every quantizer with one fixed p for all layers (``p``, default 2.0).

The input model is never modified: a BN-folded, quantized copy is returned. Activation ranges are
searched on the FP activations (quantizers disabled) of the calibration images, sampled to at most
``max_elements`` values per layer with a fixed seed; weights need no data.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, get_args

import torch
from torch import nn

from .data import ShapesDataset
from .lp import apply_scales, search_model_scales
from .quant import QuantConfig, calibrate_minmax, quant_layers, quantize_model

__all__ = ["METHODS", "PTQConfig", "PTQResult", "run_ptq", "calibration_images", "save_quantized", "load_quantized"]

Method = Literal["minmax", "lp"]
METHODS: tuple[str, ...] = get_args(Method)


@dataclass(frozen=True)
class PTQConfig:
    """Every setting of a PTQ run (reported with every result).

    Attributes:
        method: one of :data:`METHODS`.
        w_bits, a_bits: bit widths of weights and activations, 2..8.
        p: the fixed p of ``"lp"`` (must be None for the methods that choose p themselves).
        stem_8bit, pred_8bit: keep the stem conv and the head's prediction convs at W8A8 (the usual convention).
        grid: number of candidate ranges of the scale search.
        max_elements: activation values sampled per layer for the search.
        seed: seed of the activation sampling.
        batch_size: calibration batch size.
    """

    method: Method = "minmax"
    w_bits: int = 4
    a_bits: int = 4
    p: float | None = None
    stem_8bit: bool = True
    pred_8bit: bool = True
    grid: int = 100
    max_elements: int = 2**20
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not a method; allowed: {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"{name}={v!r} must be an integer in 2..8")
        if self.method == "lp":
            p = 2.0 if self.p is None else self.p
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
                raise ValueError(f"p={self.p!r} must be a finite number > 0")
            object.__setattr__(self, "p", float(p))
        elif self.p is not None:
            raise ValueError(f"p={self.p!r} is only for method 'lp'; method={self.method!r} takes no p")
        for name in ("grid", "max_elements", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, stem_8bit=self.stem_8bit, pred_8bit=self.pred_8bit)


@dataclass
class PTQResult:
    """The quantized model (a new module) and the report of the run."""

    model: nn.Module
    report: dict = field(default_factory=dict)


def calibration_images(calib, device: str | torch.device = "cpu") -> torch.Tensor:
    """A calibration set (a ShapesDataset or an ``(N, 3, H, W)`` float tensor) -> float tensor, validated."""
    if isinstance(calib, ShapesDataset):
        x = calib.images()
    elif isinstance(calib, torch.Tensor):
        x = calib
    else:
        raise ValueError(f"calib must be a ShapesDataset or an (N, 3, H, W) tensor, got {type(calib).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"calib images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("calib is empty: at least one calibration image is needed")
    if not x.is_floating_point():
        raise ValueError(f"calib images must be float in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("calib images contain NaN or inf")
    return x.to(device)


def _calibrate(qmodel: nn.Module, images: torch.Tensor, cfg: PTQConfig, progress: bool) -> dict:
    """Set every quantizer's scale (min-max, or ``s_p*`` with the fixed p); returns per-layer bits."""
    if cfg.method == "minmax":
        calibrate_minmax(qmodel, images, batch_size=cfg.batch_size)
    else:
        scales = search_model_scales(qmodel, images, (cfg.p,), grid=cfg.grid, max_elements=cfg.max_elements,
                                     seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
        apply_scales(qmodel, scales, cfg.p)
    return {name: {"w_bits": m.weight_quantizer.bits, "a_bits": m.input_quantizer.bits}
            for name, m in quant_layers(qmodel).items()}


def run_ptq(model: nn.Module, calib, method: str = "minmax", w_bits: int = 4, a_bits: int = 4,
            device: str | torch.device = "cpu", progress: bool = False, **options) -> PTQResult:
    """Quantize a copy of ``model`` with ``method`` at W``w_bits``A``a_bits``.

    Args:
        model: the FP detector (not modified).
        calib: a :class:`~detptq_mini.data.ShapesDataset` or an ``(N, 3, H, W)`` tensor of calibration images
            (labels are never used).
        method: one of :data:`METHODS`.
        w_bits, a_bits: bit widths, 2..8.
        device: where to run.
        progress: show progress bars.
        **options: the other fields of :class:`PTQConfig` (an unknown option is an error).

    Returns:
        a :class:`PTQResult` with ``.model`` (quantized copy, eval mode) and ``.report`` (``method, w_bits,
        a_bits, config, chosen_p, layers, seconds``).
    """
    allowed = {f.name for f in fields(PTQConfig)} - {"method", "w_bits", "a_bits"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for run_ptq; allowed: {', '.join(sorted(allowed))}")
    cfg = PTQConfig(method=method, w_bits=w_bits, a_bits=a_bits, **options)
    t0 = time.perf_counter()
    images = calibration_images(calib, device)
    qmodel = quantize_model(copy.deepcopy(model).to(device).eval(), cfg.quant_config())
    info = _calibrate(qmodel, images, cfg, progress)
    chosen = {name: cfg.p for name in info} if cfg.method == "lp" else {}
    report = {
        "method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "config": asdict(cfg),
        "quant_config": cfg.quant_config().to_dict(), "calib_images": len(images), "chosen_p": chosen,
        "layers": info, "seconds": time.perf_counter() - t0,
    }
    return PTQResult(qmodel.eval(), report)


def save_quantized(result: PTQResult, path, fp_config: dict) -> None:
    """Write the quantized model (weights, quantization parameters, chosen p, config) atomically."""
    from pathlib import Path
    import os

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"out={str(path)!r}: directory {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"state_dict": result.model.state_dict(), "config": fp_config,
               "quant": {"ptq_config": result.report["config"], "quant_config": result.report["quant_config"],
                         "chosen_p": result.report["chosen_p"]},
               "report": {k: v for k, v in result.report.items() if k != "seconds"}}
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_quantized(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_quantized`; returns the quantized model and its report."""
    from .model import Detector, DetectorConfig, check_state_dict

    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint={str(path)!r} does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint={str(path)!r} is not a detptq-mini checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "quant" not in ckpt:
        raise ValueError(f"checkpoint={str(path)!r} is not a quantized detptq-mini checkpoint")
    cfg = dict(ckpt["config"])
    for key in ("widths", "depths"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    qc = QuantConfig(**ckpt["quant"]["quant_config"])
    qmodel = quantize_model(Detector(DetectorConfig(**cfg)).eval(), qc)
    check_state_dict(qmodel, ckpt["state_dict"], f"checkpoint {str(path)!r}")
    qmodel.load_state_dict(ckpt["state_dict"])
    return qmodel.to(device).eval(), ckpt["report"]
