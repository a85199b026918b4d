"""``run_ptq``: every PTQ method through one path, with a validated, frozen config and a report.

Methods available now:

* ``"minmax"``: round-to-nearest with min-max ranges (weights per output channel, activations per tensor);
* ``"lp"``: the Lp scale search of every quantizer with one fixed p for all layers (``p``, default 2.0);
* ``"detptq"``: the same search for every p of ``ps``, then DetPTQ's per-layer (or per-unit) choice of p by
  ODOL (:func:`detptq_mini.detptq.select_p`; options ``granularity``, ``separate``, ``rest``, ``odol_*``,
  ``select_images``);
* ``"brecq"``, ``"joint"``, ``"qdrop"``: the ``"lp"`` scales with a fixed p (default 2), then block
  reconstruction (:func:`detptq_mini.reconstruction.reconstruct`) with the Lp loss of the same p:
  ``"brecq"`` as published (two passes: the rounding of every unit with the activations in float, then the
  step sizes with every activation quantized: ``stages = 2``, options ``act_iters``, ``act_p``);
  ``"joint"`` learns the rounding and the step sizes together with every activation element quantized
  (QDrop's scheme at ``quant_prob = 1``); ``"qdrop"`` quantizes each element with probability ``quant_prob``
  (default 0.5), with the reference's one coin at a unit's input (``qdrop_input="one-coin"``; the earlier
  ``"two-coin"`` scheme is an ablation);
* ``"detptq-qdrop"``: DetPTQ's choice of p per reconstruction unit, then QDrop reconstruction of each unit
  from its ``s_p*`` with the Lp loss of its own p (options ``iters``, ``recon_batch_size``, ``quant_prob``,
  ``round_lam``, ``lr_v``, ``lr_act``, ``recon_loss_norm``, ``qdrop_input`` for the reconstruction methods).

A long run can be stopped and resumed (``run_ptq(..., state=path)``, command line ``quantize --state PATH``)
[ours]: the quantized model after its scales (and DetPTQ's choice of p) is saved to ``path``, then again after
every reconstructed unit; a later call with the same arguments reads it and goes on from there, with the same
result bit for bit (:func:`detptq_mini.reconstruction.reconstruct`, ``resume``).

The input model is never modified: a BN-folded, quantized copy is returned. Activation ranges are
searched on the FP activations (quantizers disabled) of the calibration images, sampled to at most
``max_elements`` values per layer with a fixed seed; weights need no data. Every method takes the layer
protocol ``protocol``: ``"ours"`` (default) quantizes every conv, ``"head-fp"`` leaves the detection head's convs
in FP (QDrop's public COCO code); those convs are then no quantized layers, and every step above skips them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from .checks import check_bits, check_bool, check_choice, check_images, check_int, check_number, check_ps
from .detptq import Granularity, Rest, select_p
from .odol import ChunkedOdol, ClsMode, FgMode, LocMode, OdolConfig
from .lp import P_DEFAULT, apply_scales, lp_scale_search, search_model_scales
from .quant import (PROTOCOLS, LayerProtocol, QuantConfig, calibrate_deploy, calibrate_minmax, fold_bn, quant_layers,
                    quantize_model)
from .reconstruction import ReconConfig, ReconHistory, reconstruct
from .utils import atomic_torch_save

__all__ = ["METHODS", "PTQConfig", "PTQResult", "run_ptq", "calibration_images"]

Method = Literal["minmax", "lp", "detptq", "brecq", "joint", "qdrop", "detptq-qdrop"]
#: The methods :func:`run_ptq` runs (``PTQConfig.method``, the command line's ``--method``).
METHODS: tuple[str, ...] = get_args(Method)
RECON_METHODS: tuple[str, ...] = ("brecq", "joint", "qdrop", "detptq-qdrop")
FIXED_P_METHODS: tuple[str, ...] = ("lp", "brecq", "joint", "qdrop")
QDROP_METHODS: tuple[str, ...] = ("qdrop", "detptq-qdrop")
DetptqUse = Literal["both", "scales", "loss"]
DETPTQ_USES: tuple[str, ...] = get_args(DetptqUse)
# each reconstruction method's own settings (the others are ReconConfig's defaults); BRECQ's step-size rate is its
# reference's (4e-4), the others' QDrop's (ReconConfig's default, 4e-5)
_METHOD_RECON = {"brecq": {"quant_prob": 1.0, "stages": 2, "lr_act": 4e-4}, "joint": {"quant_prob": 1.0},
                 "qdrop": {"quant_prob": 0.5}, "detptq-qdrop": {"quant_prob": 0.5}}
# the reconstruction options of PTQConfig and the ReconConfig field each one sets (p and seed are shared options)
_RECON_OPTIONS = (("iters", "iters"), ("recon_batch_size", "batch_size"), ("quant_prob", "quant_prob"),
                  ("round_lam", "lam"), ("lr_v", "lr_v"), ("lr_act", "lr_act"), ("recon_loss_norm", "loss_norm"),
                  ("qdrop_input", "qdrop_input"), ("stages", "stages"), ("act_iters", "act_iters"),
                  ("act_p", "act_p"))


@dataclass(frozen=True)
class PTQConfig:
    """Every setting of a PTQ run (reported with every result).

    Attributes:
        method: one of :data:`METHODS`.
        w_bits, a_bits: bit widths of weights and activations, 2..8.
        p: the fixed p of ``"lp"``, ``"brecq"`` and ``"qdrop"`` (default 2.0; must be None for the methods
            that choose p themselves).
        stem_8bit, pred_8bit: keep the stem conv and the head's prediction convs at W8A8 (the usual convention).
        protocol: which convs are quantized, one of :data:`~detptq_mini.quant.PROTOCOLS`: ``"ours"`` (default)
            every conv; ``"head-fp"`` every conv but the head's, which stay FP (QDrop's public COCO code); see
            :class:`~detptq_mini.quant.QuantConfig`.
        grid: number of candidate ranges of the scale search.
        max_elements: activation values sampled per layer for the search.
        seed: seed of the activation sampling.
        batch_size: calibration images per forward. Given explicitly to :func:`run_ptq`, the calibration set
            must hold at least this many images (a "tiny" set is an error); the default is an upper bound.
        ps: the candidate p of ``"detptq"`` (default ``P = {1, 1.5, ..., 4.5}``).
        granularity: ``"detptq"``: one p per ``"layer"`` (its default) or per ``"unit"``; ``"detptq-qdrop"``
            is per ``"unit"`` (its reconstruction loss needs one p per unit).
        separate: ``"detptq"``: choose the weight p and the activation p separately.
        rest: ``"detptq"``: the layers after the one being tried are ``"fp"`` or ``"quantized"`` (p = 2).
        odol_cls, odol_loc, odol_fg, odol_lam: ``"detptq"``: the ODOL variant (default KL + L1, soft, 1.0).
        select_images: ``"detptq"``: the first this many calibration images measure ODOL (default: all).
        select_batch_size: ``"detptq"``: images per forward of the selection.
        iters: reconstruction steps per unit (the reconstruction methods).
        recon_batch_size: samples per reconstruction step.
        quant_prob: probability that an activation element is quantized during reconstruction (default: 1.0
            for ``"brecq"`` and ``"joint"``, which require it, 0.5 for ``"qdrop"`` and ``"detptq-qdrop"``).
        qdrop_input: ``"qdrop"``, ``"detptq-qdrop"``: ``"one-coin"`` (default, the reference) or ``"two-coin"``
            (the earlier scheme, an ablation); see :class:`~detptq_mini.reconstruction.ReconConfig`.
        stages: set by the method, recorded in the report: 2 for ``"brecq"`` (weights, then step sizes), 1 for
            the others (giving another value is an error).
        act_iters, act_p: ``"brecq"``'s second stage: steps per unit (default ``iters // 4``) and the p of its
            loss (default 2.4, the reference's).
        detptq_use: ``"detptq-qdrop"``: where DetPTQ's per-unit p goes: ``"both"`` (default: the starting scales
            ``s_p*`` and the reconstruction loss), ``"scales"`` (``s_p*``, the loss at p = 2) or ``"loss"`` (the
            p = 2 scales, the loss at the chosen p): which half of DetPTQ's p matters inside reconstruction.
        round_lam: weight of AdaRound's rounding regulariser.
        lr_v, lr_act: Adam learning rates of the rounding variables and of the activation step sizes.
        recon_loss_norm: ``"none"`` (default) or ``"before"``: each unit's Lp loss divided by its value before
            reconstruction (:attr:`~detptq_mini.reconstruction.ReconConfig.loss_norm`).
        deploy: W8A8 or W4A8: after the method, calibrate the deploy quantizers (each conv's output and each SiLU's
            sigmoid: their ``s_p*`` on their own tensors over the calibration images, one p for all of them
            chosen among ``ps`` by ODOL, as DetPTQ chooses p; :func:`~detptq_mini.quant.calibrate_deploy`), so
            that the model computes what the fused int8 ONNX graph computes; the report gets ``"deploy"``: the
            p and the ODOL of every candidate. Off by default (the study methods); in the report's ``config``
            only when True.
    """

    method: Method = "minmax"
    w_bits: int = 4
    a_bits: int = 4
    p: float | None = None
    stem_8bit: bool = True
    pred_8bit: bool = True
    protocol: LayerProtocol = "ours"
    grid: int = 100
    max_elements: int = 2**20
    seed: int = 0
    batch_size: int = 32
    ps: tuple[float, ...] = P_DEFAULT
    granularity: Granularity | None = None
    separate: bool = False
    rest: Rest = "fp"
    odol_cls: ClsMode = "kl"
    odol_loc: LocMode = "l1"
    odol_fg: FgMode = "soft"
    odol_lam: float = 1.0
    select_images: int | None = None
    select_batch_size: int = 64
    iters: int | None = None
    recon_batch_size: int | None = None
    quant_prob: float | None = None
    round_lam: float | None = None
    lr_v: float | None = None
    lr_act: float | None = None
    recon_loss_norm: str | None = None
    qdrop_input: str | None = None
    stages: int | None = None
    act_iters: int | None = None
    act_p: float | None = None
    detptq_use: DetptqUse = "both"
    deploy: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not a method; allowed: {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            object.__setattr__(self, name, check_bits(name, getattr(self, name)))
        check_choice("protocol", self.protocol, PROTOCOLS)
        if self.method in FIXED_P_METHODS:
            p = 2.0 if self.p is None else self.p
            object.__setattr__(self, "p", check_number("p", p, 0, low_open=True))
        elif self.p is not None:
            hint = " (it chooses p per layer itself)" if self.method.startswith("detptq") else ""
            raise ValueError(f"p={self.p!r} is only for the methods {', '.join(FIXED_P_METHODS)}; "
                             f"method={self.method!r} takes no p{hint}")
        self._check_detptq()
        self._check_recon()
        check_choice("detptq_use", self.detptq_use, DetptqUse)
        if self.detptq_use != "both" and self.method != "detptq-qdrop":
            raise ValueError(f"detptq_use={self.detptq_use!r} only applies to the method 'detptq-qdrop', "
                             f"not method={self.method!r}")
        for name in ("grid", "max_elements", "batch_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        if check_bool("deploy", self.deploy) and (self.a_bits != 8 or self.w_bits not in (4, 8)):
            raise ValueError(f"deploy=True needs a_bits=8 and w_bits 8 or 4 (the fused graph: allowed W8A8, W4A8); "
                             f"got w_bits={self.w_bits}, a_bits={self.a_bits}")

    def _check_detptq(self) -> None:
        """Validate the ``"detptq"`` options; with another method they must keep their defaults."""
        own = ("ps", "granularity", "separate", "rest", "odol_cls", "odol_loc", "odol_fg", "odol_lam",
               "select_images", "select_batch_size")
        if not self.method.startswith("detptq"):
            changed = [f.name for f in fields(self) if f.name in own and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to the methods 'detptq' and 'detptq-qdrop', "
                                 f"not method={self.method!r}")
        else:
            default = "unit" if self.method == "detptq-qdrop" else "layer"
            object.__setattr__(self, "granularity", self.granularity or default)
            if self.method == "detptq-qdrop" and (self.granularity != "unit" or self.separate):
                raise ValueError("method='detptq-qdrop' chooses one p per reconstruction unit: granularity must be "
                                 f"'unit' (got {self.granularity!r}) and separate False (got {self.separate!r})")
        object.__setattr__(self, "ps", check_ps(self.ps))
        for name, mode in {"rest": Rest, "odol_cls": ClsMode, "odol_loc": LocMode, "odol_fg": FgMode}.items():
            check_choice(name, getattr(self, name), mode)
        if self.granularity is not None:
            check_choice("granularity", self.granularity, Granularity)
        check_bool("separate", self.separate)
        object.__setattr__(self, "odol_lam", check_number("odol_lam", self.odol_lam, 0))
        object.__setattr__(self, "select_images", check_int("select_images", self.select_images, 1, allow_none=True))
        object.__setattr__(self, "select_batch_size", check_int("select_batch_size", self.select_batch_size, 1))

    def _check_recon(self) -> None:
        """Validate the reconstruction options (resolving their defaults); other methods must leave them None."""
        given = [option for option, _ in _RECON_OPTIONS if getattr(self, option) is not None]
        if self.method not in RECON_METHODS:
            if given:
                raise ValueError(f"option(s) {', '.join(given)} only apply to the reconstruction methods "
                                 f"{', '.join(RECON_METHODS)}, not method={self.method!r}")
            return
        own = _METHOD_RECON[self.method]
        if self.method in ("brecq", "joint") and self.quant_prob not in (None, 1, 1.0):
            raise ValueError(f"quant_prob={self.quant_prob!r}: method={self.method!r} quantizes every activation "
                             "element (quant_prob=1.0); use method 'qdrop' for another probability")
        if self.stages is not None and self.stages != own.get("stages", 1):
            raise ValueError(f"stages={self.stages!r}: method={self.method!r} has {own.get('stages', 1)} stage(s); "
                             "choose the method ('brecq': 2, the others: 1)")
        for option, methods in (("qdrop_input", QDROP_METHODS), ("act_iters", ("brecq",)), ("act_p", ("brecq",))):
            if getattr(self, option) is not None and self.method not in methods:
                raise ValueError(f"{option} only applies to the method(s) {', '.join(methods)}, "
                                 f"not method={self.method!r}")
        values = {key: getattr(self, option) for option, key in _RECON_OPTIONS if getattr(self, option) is not None}
        resolved = ReconConfig(**{**own, **values})  # the others: its defaults
        for option, key in _RECON_OPTIONS:
            object.__setattr__(self, option, getattr(resolved, key))
        if self.method not in QDROP_METHODS:
            object.__setattr__(self, "qdrop_input", None)  # no coin is tossed: the option means nothing here
        if self.method != "brecq":
            object.__setattr__(self, "act_iters", None)
            object.__setattr__(self, "act_p", None)

    def recon_config(self) -> ReconConfig:
        """The :class:`~detptq_mini.reconstruction.ReconConfig` of a reconstruction method."""
        if self.method not in RECON_METHODS:
            raise ValueError(f"method={self.method!r} does no reconstruction")
        values = {key: getattr(self, option) for option, key in _RECON_OPTIONS if getattr(self, option) is not None}
        return ReconConfig(**values, p=2.0 if self.p is None else self.p, seed=self.seed)

    def quant_config(self) -> QuantConfig:
        """The :class:`~detptq_mini.quant.QuantConfig` of the run: bits, 8-bit conventions and layer protocol."""
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, stem_8bit=self.stem_8bit, pred_8bit=self.pred_8bit,
                           protocol=self.protocol, deploy=self.deploy)

    def to_dict(self) -> dict:
        """The config as a plain dict (the report's ``config``); ``deploy`` only when True, so that the reports
        of the study methods read as before."""
        out = asdict(self)
        if not self.deploy:
            del out["deploy"]
        return out


@dataclass
class PTQResult:
    """The quantized model (a new module) and the report of the run."""

    model: nn.Module
    report: dict = field(default_factory=dict)
    history: ReconHistory | None = None  # the reconstruction methods: loss curves per unit


def calibration_images(calib, device: str | torch.device = "cpu", min_images: int = 1,
                       min_what: str | None = None) -> torch.Tensor:
    """A calibration set (a data set with ``.images()``, such as a ShapesDataset, or an ``(N, 3, H, W)`` float
    tensor: what :func:`~detptq_mini.detptq.select_p` accepts) -> float tensor on ``device``.

    Validated by :func:`detptq_mini.checks.check_images` (shape, dtype, NaN/inf, empty, at least ``min_images``
    images, ``min_what`` saying why); errors name the argument ``calib``.
    """
    return check_images(calib, "calib", min_images, min_what).to(device)


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


def _calibrate_deploy(qmodel: nn.Module, model: nn.Module, images: torch.Tensor, cfg: PTQConfig) -> dict:
    """The deploy quantizers (``deploy=True``): for every p of ``cfg.ps``, each one's ``s_p*`` on its own tensor
    (:func:`~detptq_mini.quant.calibrate_deploy` with the Lp search); the p with the lowest ODOL of the finished
    model on the calibration images is kept, one p for all of them (method page, section 7). Returns
    ``{"p", "odol": {p: ODOL}}``."""
    device = images.device
    odol_cfg = OdolConfig(cls=cfg.odol_cls, loc=cfg.odol_loc, fg=cfg.odol_fg, lam=cfg.odol_lam)
    chunks = [images[i:i + cfg.select_batch_size] for i in range(0, len(images), cfg.select_batch_size)]
    with torch.no_grad():
        fp = copy.deepcopy(model).to(device).eval()
        score = ChunkedOdol([fp(c) for c in chunks], odol_cfg)
        del fp
        odol = {}
        for p in cfg.ps:
            calibrate_deploy(qmodel, images, batch_size=cfg.batch_size, max_elements=2**14, seed=cfg.seed,
                             search=lambda x, p=p: lp_scale_search(x, 8, (p,), grid=cfg.grid)[p])
            qmodel.eval()
            odol[p] = score([qmodel(c) for c in chunks])
    best = min(odol, key=lambda p: (odol[p], p))
    calibrate_deploy(qmodel, images, batch_size=cfg.batch_size, max_elements=2**14, seed=cfg.seed,
                     search=lambda x: lp_scale_search(x, 8, (best,), grid=cfg.grid)[best])
    return {"p": best, "odol": odol}


def _detptq(qmodel: nn.Module, images: torch.Tensor, cfg: PTQConfig, progress: bool):
    """Search ``s_p*`` for every p of ``cfg.ps`` (and p = 2 for ``rest="quantized"``), then select p per layer."""
    n = len(images) if cfg.select_images is None else cfg.select_images
    if n > len(images):
        raise ValueError(f"select_images={n} exceeds the {len(images)} calibration images")
    search_ps = tuple(dict.fromkeys(cfg.ps + (2.0,)))
    scales = search_model_scales(qmodel, images, search_ps, grid=cfg.grid, max_elements=cfg.max_elements,
                                 seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
    odol = OdolConfig(cls=cfg.odol_cls, loc=cfg.odol_loc, fg=cfg.odol_fg, lam=cfg.odol_lam)
    selection = select_p(qmodel, images[:n], scales, ps=cfg.ps, granularity=cfg.granularity, separate=cfg.separate,
                         rest=cfg.rest, odol=odol, batch_size=cfg.select_batch_size, progress=progress, rest_p=2.0)
    if cfg.detptq_use == "loss":  # the chosen p only in the reconstruction loss: the quantizers start from s_2*
        apply_scales(qmodel, scales, 2.0)
    return selection


class _State:
    """``run_ptq``'s progress file (``state=``): what a later call needs to go on where this one stopped.

    The file (``torch.save``, written atomically) holds a fingerprint of the run (the config, the calibration
    images' shape and sums, the FP model's parameter sums), the phase (``"init"``: the quantized model after its
    scales and DetPTQ's selection; ``"recon"``: after a reconstructed unit, with the reconstruction's progress
    record), the quantized model's ``state_dict`` and the time spent so far. It holds a pickled
    :class:`~detptq_mini.detptq.Selection`, so it is read with ``weights_only=False``: read only files you wrote.
    The fingerprint does not hold the code: a file written by another version of the library is resumed as it
    is (the benchmark's records say which code made each run). The time it counts is that of every run up to its
    last save: what a killed run did after it is lost, as the work itself.
    """

    VERSION = 1

    def __init__(self, path, cfg: PTQConfig, model: nn.Module, images: torch.Tensor):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"state={str(path)!r}: directory {str(self.path.parent)!r} does not exist")
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"state={str(path)!r} exists and is not a file")
        x = images.detach().double()
        params = [p.detach().double() for p in model.parameters()]
        self.fingerprint = {"config": cfg.to_dict(), "model": type(model).__name__,
                            "images": [list(images.shape), float(x.sum()), float(x.square().sum())],
                            "params": [sum(p.numel() for p in params), float(sum(p.sum() for p in params))]}
        self.before = {"runs": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def read(self) -> dict | None:
        """The saved progress of this run, or None when there is no file; a ValueError for another run's."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"state={str(self.path)!r} cannot be read ({type(e).__name__}: {e}); delete it to "
                             "start afresh") from None
        if not isinstance(saved, dict) or saved.get("version") != self.VERSION:
            raise ValueError(f"state={str(self.path)!r} is not a run_ptq progress file of this version; delete it "
                             "to start afresh")
        if not isinstance(saved.get("fingerprint"), dict):
            raise ValueError(f"state={str(self.path)!r} has no fingerprint: it is not a run_ptq progress file; "
                             "delete it to start afresh")
        for key, mine in self.fingerprint.items():
            if saved["fingerprint"].get(key) != mine:
                raise ValueError(f"state={str(self.path)!r} is the progress of another run (its {key} differs: "
                                 f"{saved['fingerprint'].get(key)!r}, this run's {mine!r}); delete it or pass "
                                 "another path")
        self.before = {"runs": saved["runs"], "seconds": saved["seconds"], "cpu_seconds": saved["cpu_seconds"]}
        return saved

    def seconds(self) -> tuple[float, float]:
        """Wall and CPU seconds of this run and the earlier ones together."""
        return (self.before["seconds"] + time.perf_counter() - self.t0,
                self.before["cpu_seconds"] + time.process_time() - self.c0)

    def write(self, phase: str, qmodel: nn.Module, **fields) -> None:
        wall, cpu = self.seconds()
        atomic_torch_save({"version": self.VERSION, "fingerprint": self.fingerprint, "phase": phase,
                           "model": qmodel.state_dict(), "runs": self.before["runs"] + 1, "seconds": wall,
                           "cpu_seconds": cpu, **fields}, self.path, "state")


def run_ptq(model: nn.Module, calib, method: str = "minmax", w_bits: int = 4, a_bits: int = 4,
            device: str | torch.device = "cpu", progress: bool = False, state=None, **options) -> PTQResult:
    """Quantize a copy of ``model`` with ``method`` at W``w_bits``A``a_bits``.

    Args:
        model: the FP detector (not modified).
        calib: a data set with ``.images()`` (a :class:`~detptq_mini.data.ShapesDataset`) or an ``(N, 3, H, W)``
            tensor of calibration images (labels are never used).
        method: one of :data:`METHODS`.
        w_bits, a_bits: bit widths, 2..8.
        device: where to run.
        progress: show progress bars.
        state: None, or a file path for the run's progress: the quantized model is saved there after its
            scales (and DetPTQ's selection) and after every reconstructed unit, and a call with the same
            arguments that finds the file goes on from where it was written (a file of another run is an
            error). The result is the same as an uninterrupted run's; ``report["seconds"]`` counts every run,
            and ``report["resumed"]`` says how many earlier runs there were and what they cost. The file is
            left in place: delete it once the result is saved (``quantize --state`` does).
        **options: the other fields of :class:`PTQConfig` (an unknown option is an error).

    Returns:
        a :class:`PTQResult` with ``.model`` (quantized copy, eval mode) and ``.report`` (``method, w_bits,
        a_bits, config, chosen_p, layers, seconds``; for ``"detptq"`` also ``selection``, the
        :meth:`~detptq_mini.detptq.Selection.to_dict` of the p selection: ``chosen_p`` is then the chosen p per
        layer, or ``{"weight": ..., "act": ...}`` with ``separate=True``).
    """
    allowed = {f.name for f in fields(PTQConfig)} - {"method", "w_bits", "a_bits"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for run_ptq; allowed: {', '.join(sorted(allowed))}")
    cfg = PTQConfig(method=method, w_bits=w_bits, a_bits=a_bits, **options)
    t0 = time.perf_counter()
    # a batch size asked for explicitly must fit the calibration set; the default one is an upper bound
    need = cfg.batch_size if "batch_size" in options else 1
    images = calibration_images(calib, device, need, f"batch_size={cfg.batch_size}" if need > 1 else None)
    qmodel = quantize_model(copy.deepcopy(model).to(device).eval(), cfg.quant_config())
    saver = _State(state, cfg, model, images) if state is not None else None
    saved = saver.read() if saver is not None else None
    selection = history = None
    if saved is not None:  # the scales (and DetPTQ's selection) of an earlier run, and its reconstruction so far
        qmodel.load_state_dict(saved["model"])
        selection, info, t_init = saved["selection"], saved["info"], saved["t_init"]
    else:
        if cfg.method.startswith("detptq"):
            selection = _detptq(qmodel, images, cfg, progress)
            info = {name: {"w_bits": m.weight_quantizer.bits, "a_bits": m.input_quantizer.bits}
                    for name, m in quant_layers(qmodel).items()}
        else:
            info = _calibrate(qmodel, images, cfg, progress)
        t_init = time.perf_counter() - t0
        if saver is not None:
            saver.write("init", qmodel, selection=selection, info=info, t_init=t_init, recon=None)
    if cfg.method in RECON_METHODS:
        # DetPTQ's p in the loss of each unit, unless only its starting scales are used (detptq_use="scales")
        unit_p = selection.chosen if selection is not None and cfg.detptq_use != "scales" else None
        fp_model = fold_bn(copy.deepcopy(model).to(device).eval())
        checkpoint = None
        if saver is not None:
            def checkpoint(record):
                saver.write("recon", qmodel, selection=selection, info=info, t_init=t_init, recon=record)
        history = reconstruct(qmodel, fp_model, images, cfg.recon_config(), unit_p=unit_p, progress=progress,
                              resume=None if saved is None else saved["recon"], checkpoint=checkpoint)
    deploy = _calibrate_deploy(qmodel, model, images, cfg) if cfg.deploy else None
    chosen = {name: cfg.p for name in info} if cfg.method in FIXED_P_METHODS else {}
    if selection is not None:  # per layer (units expanded); weight and activation p apart with separate=True
        chosen = ({"weight": selection.layer_p("weight"), "act": selection.layer_p("act")} if cfg.separate
                  else selection.layer_p())
    report = {
        "method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "config": cfg.to_dict(),
        "quant_config": cfg.quant_config().to_dict(), "calib_images": len(images), "chosen_p": chosen,
        "layers": info, "seconds": time.perf_counter() - t0,
    }
    if saver is not None:
        report["seconds"] = saver.seconds()[0]
        if saver.before["runs"]:
            report["resumed"] = {"runs": saver.before["runs"], "seconds_before": saver.before["seconds"],
                                 "cpu_seconds_before": saver.before["cpu_seconds"]}
    if deploy is not None:
        report["deploy"] = deploy  # the p of the deploy quantizers and the ODOL of every candidate
    if selection is not None:
        report["selection"] = selection.to_dict()  # the chosen p per item and the ODOL of every candidate
    if history is not None:
        report["reconstruction"] = history.summary()
        report["timings"] = {"scales_and_selection": t_init, "reconstruction": history.seconds["total"]}
    return PTQResult(qmodel.eval(), report, history)
