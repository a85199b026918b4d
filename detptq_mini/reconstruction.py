"""Block reconstruction: BRECQ, QDrop and DetPTQ's per-unit Lp loss (method page, section 6).

Simple PTQ sets each quantizer's scale and rounds every weight to nearest. *Reconstruction* then tunes
the quantized network one unit at a time so that each unit's output matches the FP network's:

* the units are the model's own (:class:`~detptq_mini.model.Detector`'s ``units``: the stem, each downsampling
  conv, each C2f block, SPPF, each neck unit and each head branch), in forward order;
* for unit ``k`` three tensors are cached over the calibration set: its input from the *quantized* prefix
  (units ``< k`` already reconstructed, every quantizer on), its input from the FP model, and its FP
  output (the target);
* the unit's weights get learned rounding (:mod:`detptq_mini.adaround`: ``V``, Adam at ``lr_v``) and its
  input quantizers' step sizes are learned too (LSQ, Adam at ``lr_act`` with cosine decay to 0), on::

      loss = mean_(b, y, x) sum_c |unit(x_in) - y_fp|^p
             + lam * sum_layers f_reg(V, beta)

  (the Lp reconstruction loss summed over channels, as BRECQ's ``lp_loss``), batch ``batch_size``; with
  ``loss_norm="before"`` the first term is divided by its value before reconstruction (an experiment of ours);
* three schedules (``ReconConfig.stages``, ``quant_prob``): ``joint`` learns rounding and step sizes together
  with every activation element quantized; QDrop [Wei et al. 2022] (:mod:`detptq_mini.qdrop`) quantizes each
  activation element with probability ``quant_prob`` during reconstruction and leaves it FP otherwise, with
  the reference's one coin per element at the unit's input (kept: the quantized-prefix input, quantized;
  dropped: the FP input); BRECQ [Li et al. 2021] as published (``stages=2``) learns the rounding of every
  unit with the activations in float first, then the step sizes with the rounding fixed (method page,
  section 6);
* at the end of each unit the hard rounding is written into the weights and the learned step sizes into
  the quantizers, and the unit's quantized output (hard, every element quantized) is cached as the next
  unit's quantized-prefix input.

A long run can be stopped and resumed unit by unit [ours]: :func:`reconstruct` hands a progress record to its
``checkpoint`` callback after every unit, and a later call given that record (``resume``) and the model as it
was then skips the finished units; the result is the same bit for bit, because every unit's random streams are
seeded from ``(seed, unit name)`` and its inputs are recomputed from the restored model in the same order
(:func:`detptq_mini.pipeline.run_ptq` with ``state=`` saves and reads them).

The p of the loss is ``p`` for every unit (the BRECQ and QDrop baselines: 2; StablePTQ's 2.4 is an option)
or, in DetPTQ mode, the p chosen for that unit by :func:`detptq_mini.detptq.select_p` at unit
granularity, whose ``s_p*`` are also the unit's starting scales [ours, method page, section 6]. Every method runs
through :func:`reconstruct`; only ``p`` (per unit), ``quant_prob`` and ``stages`` differ.

The paper's check that learned rounding does not move the best p is :func:`detptq_mini.studies.rounding_ablation`.
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Literal, Sequence, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import adaround, qdrop
from .checks import check_choice, check_images, check_int, check_number
from .model import check_unit_detector
from .quant import QuantConv2d, eval_mode, quant_layers, quant_state_kept

LossNorm = Literal["none", "before"]
LOSS_NORMS: tuple[str, ...] = get_args(LossNorm)
QDropInput = Literal["one-coin", "two-coin"]
QDROP_INPUTS: tuple[str, ...] = get_args(QDropInput)
Learn = Literal["both", "weights", "acts"]
LEARNS: tuple[str, ...] = get_args(Learn)

__all__ = ["LOSS_NORMS", "QDROP_INPUTS", "LEARNS", "ReconConfig", "UnitHistory", "ReconHistory", "lp_loss", "reconstruct_unit", "reconstruct"]


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class ReconConfig:
    """Settings of one reconstruction run (defaults: BRECQ/QDrop's, method page, section 6).

    Attributes:
        iters: optimisation steps per unit (the references use 20,000 on ImageNet GPUs; see the chapter).
        batch_size: cached calibration samples per step.
        lr_v: Adam learning rate of the rounding variables ``V``.
        lr_act: Adam learning rate of the input quantizers' step sizes (cosine-annealed to 0); 0 keeps them.
        lam: weight of the rounding regulariser (summed over every weight of the unit).
        warmup: fraction of ``iters`` with the regulariser off.
        beta: regulariser temperature ``(start, end)``, annealed linearly after the warm-up.
        quant_prob: probability that an activation element is quantized during reconstruction (QDrop 0.5;
            1.0 quantizes every element, as BRECQ and the joint scheme).
        qdrop_input: how QDrop treats a unit's input (``quant_prob < 1``): ``"one-coin"`` (the reference: one
            coin per element, kept -> the quantized-prefix input quantized by its conv's quantizer, dropped ->
            the FP input in float; fresh random numbers per element) or ``"two-coin"`` (the earlier scheme,
            kept as an ablation [ours]: see :mod:`detptq_mini.qdrop`).
        stages: ``1``: the rounding and the step sizes are learned together, per unit (QDrop's scheme; with
            ``quant_prob = 1`` the "joint" method); ``2``: BRECQ as published: a first pass over every unit
            learns the rounding with every activation quantizer off (inputs from the weight-quantized prefix),
            a second pass learns the step sizes with the hard-rounded weights fixed and every activation
            quantizer on, on the FP model's unit inputs (the reference's ``asym=False``), for ``act_iters``
            steps at ``lr_act`` with the ``act_p`` loss.
        act_iters: the second stage's steps per unit (default ``iters // 4``: the reference's 5,000 activation
            steps to 20,000 weight steps).
        act_p: the p of the second stage's Lp loss (the reference's default 2.4).
        p: the p of the Lp reconstruction loss, for units without their own p.
        seed: seeds the batch sampling and the QDrop masks (each unit from ``(seed, unit name)``).
        chunk: images per forward when caching (memory only; results do not depend on it).
        loss_norm: ``"none"`` (the default, BRECQ's): the Lp loss as it is; ``"before"``: the unit's Lp loss divided
            by its own value before reconstruction (:attr:`UnitHistory.before`), so that every unit starts at 1
            whatever its p and the scale of its output, and ``lam`` weighs the regulariser alike against every
            unit's loss [ours: an experiment on why DetPTQ's per-unit p loses to p = 2 inside reconstruction].
    """

    iters: int = 2000
    batch_size: int = 32
    lr_v: float = 1e-3
    lr_act: float = 4e-5
    lam: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    quant_prob: float = 0.5
    p: float = 2.0
    seed: int = 0
    chunk: int = 64
    loss_norm: LossNorm = "none"
    qdrop_input: QDropInput = "one-coin"
    stages: int = 1
    act_iters: int | None = None
    act_p: float = 2.4

    def __post_init__(self):
        for name, low in (("iters", 1), ("batch_size", 1), ("seed", 0), ("chunk", 1)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low))
        check_number("lr_v", self.lr_v, 0, low_open=True)
        check_number("lr_act", self.lr_act, 0)
        check_number("lam", self.lam, 0)
        check_number("warmup", self.warmup, 0, 1, high_open=True)
        beta = tuple(self.beta) if isinstance(self.beta, (tuple, list)) else None
        if beta is None or len(beta) != 2:
            raise ValueError(f"beta={self.beta!r} must be a pair (start, end) of numbers > 0")
        object.__setattr__(self, "beta", tuple(check_number("beta", b, 0, low_open=True) for b in beta))
        object.__setattr__(self, "quant_prob", check_number("quant_prob", self.quant_prob, 0, 1, low_open=True))
        object.__setattr__(self, "p", check_number("p", self.p, 0, low_open=True))
        check_choice("loss_norm", self.loss_norm, LossNorm)
        check_choice("qdrop_input", self.qdrop_input, QDropInput)
        if self.stages not in (1, 2) or isinstance(self.stages, bool):
            raise ValueError(f"stages={self.stages!r} must be 1 (joint) or 2 (BRECQ: weights, then step sizes)")
        if self.stages == 2 and self.quant_prob != 1:
            raise ValueError(f"quant_prob={self.quant_prob!r}: stages=2 (BRECQ) quantizes every activation element; "
                             "it needs quant_prob=1.0")
        act_iters = max(self.iters // 4, 1) if self.act_iters is None else self.act_iters
        object.__setattr__(self, "act_iters", check_int("act_iters", act_iters, 0))
        object.__setattr__(self, "act_p", check_number("act_p", self.act_p, 0, low_open=True))

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ history
@dataclass
class UnitHistory:
    """What happened to one unit.

    Attributes:
        name: the unit.
        p: the p of its reconstruction loss.
        layers: its quantized convs.
        loss: the reconstruction loss of every step (on the step's batch, with QDrop's random masks; divided by
            ``before`` with ``loss_norm="before"``).
        reg: the regulariser term ``lam * f_reg`` of every step (0 in the warm-up).
        before: the loss on every cached sample with the quantized-prefix input and every element quantized,
            before reconstruction (round-to-nearest, the starting scales).
        after: the same loss after reconstruction.
        after_mse: ``after`` with p = 2 (comparable across methods whatever their p).
        act_loss: BRECQ's second stage (``stages=2``): the loss of every step of the step-size pass.
        flipped: weights whose rounding differs from round-to-nearest at the end, per layer.
        seconds: wall time of the optimisation (both stages).
    """

    name: str
    p: float
    layers: tuple[str, ...]
    loss: list[float] = field(default_factory=list)
    reg: list[float] = field(default_factory=list)
    before: float = math.nan
    after: float = math.nan
    after_mse: float = math.nan
    act_loss: list[float] = field(default_factory=list)
    flipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"p": self.p, "before": self.before, "after": self.after, "after_mse": self.after_mse,
                "layers": list(self.layers), "flipped": dict(self.flipped), "seconds": self.seconds}


@dataclass
class ReconHistory:
    """The result of :func:`reconstruct`: the config and a :class:`UnitHistory` per unit, in order."""

    config: ReconConfig
    units: dict[str, UnitHistory] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready: the config, per unit ``p, before, after, flipped, seconds``, and the time split."""
        return {"config": self.config.to_dict(), "units": {n: h.summary() for n, h in self.units.items()},
                "seconds": dict(self.seconds)}


# ------------------------------------------------------------------ pieces
def lp_loss(out: Tensor, target: Tensor, p: float) -> Tensor:
    """``mean over (batch, y, x) of sum_c |out - target|^p`` (BRECQ's ``lp_loss`` with any p)."""
    d = (out - target).abs()
    d = d.square() if p == 2 else d.pow(p)
    return d.sum(1).mean()


def _unit_layers(module: nn.Module, prefix: str) -> dict[str, QuantConv2d]:
    if isinstance(module, QuantConv2d):
        return {prefix: module}
    return {f"{prefix}.{n}" if prefix else n: m for n, m in module.named_modules() if isinstance(m, QuantConv2d)}


@torch.no_grad()
def _apply(module: nn.Module, inputs: Sequence[Tensor], chunk: int) -> Tensor:
    n = inputs[0].shape[0]
    return torch.cat([module(*[x[i:i + chunk] for x in inputs]) for i in range(0, n, chunk)])


@torch.no_grad()
def _full_loss(module: nn.Module, inputs: Sequence[Tensor], target: Tensor, p: float, chunk: int) -> float:
    n, total = inputs[0].shape[0], 0.0
    for i in range(0, n, chunk):
        out = module(*[x[i:i + chunk] for x in inputs])
        total += float(lp_loss(out, target[i:i + chunk], p)) * out.shape[0]
    return total / n


def reconstruct_unit(module: nn.Module, x_q: Sequence[Tensor], x_fp: Sequence[Tensor], y_fp: Tensor,
                     p: float | None = None, config: ReconConfig = ReconConfig(), name: str = "unit",
                     progress: bool = False, learn: Learn = "both") -> UnitHistory:
    """Reconstruct one unit in place: learned rounding of its weights and step sizes of its inputs.

    Args:
        module: the quantized unit (a module containing :class:`~detptq_mini.quant.QuantConv2d` layers with
            calibrated quantizers, or one such layer); called as ``module(*inputs)``.
        x_q: the unit's inputs from the quantized prefix, each ``(N, ...)``.
        x_fp: the same inputs from the FP model.
        y_fp: the FP output (the target), ``(N, C, H, W)``.
        p: the p of the Lp loss (default ``config.p``).
        config: a :class:`ReconConfig`.
        name: the unit's name (seeds its random streams, labels the history).
        progress: a tqdm bar over the steps.
        learn: ``"both"`` (the rounding and the step sizes, ``config.iters`` steps), ``"weights"`` (the rounding
            only: BRECQ's first stage, run with the activation quantizers off) or ``"acts"`` (the step sizes only,
            ``config.act_iters`` steps at ``config.lr_act``, no regulariser: BRECQ's second stage).

    Returns:
        a :class:`UnitHistory`. On return the weights hold the hard rounding and the quantizers the learned
        step sizes; the module is back to plain quantizers (also if interrupted).
    """
    if not isinstance(config, ReconConfig):
        raise ValueError(f"config must be a ReconConfig, got {type(config).__name__}")
    check_choice("learn", learn, Learn)
    p = config.p if p is None else check_number("p", p, 0, low_open=True)
    x_q, x_fp = list(x_q), list(x_fp)
    if not x_q or len(x_q) != len(x_fp):
        raise ValueError("x_q and x_fp must be non-empty lists of the same length (one tensor per unit input)")
    n = y_fp.shape[0]
    if any(t.shape[0] != n for t in x_q + x_fp):
        raise ValueError("x_q, x_fp and y_fp must hold the same number of samples")
    layers = _unit_layers(module, name)
    hist = UnitHistory(name=name, p=p, layers=tuple(layers))
    if not layers:
        raise ValueError(f"unit {name!r} has no QuantConv2d layers to reconstruct")
    device = y_fp.device
    gen = torch.Generator(device).manual_seed(zlib.crc32(f"{config.seed}:{name}".encode()))
    hist.before = _full_loss(module, x_q, y_fp, p, config.chunk)
    # loss_norm="before": every unit's loss starts at 1 (a unit already exact, before == 0, is left as it is)
    norm = 1.0 / hist.before if config.loss_norm == "before" and hist.before > 0 else 1.0
    iters = config.act_iters if learn == "acts" else config.iters
    prob = config.quant_prob if learn == "both" else 1.0
    one_coin = prob < 1 and config.qdrop_input == "one-coin"
    # the reference's coin at the unit's input, found on the plain quantizers (before any is swapped)
    coin = qdrop.InputCoin(module, layers, x_q, prob, gen) if one_coin else None

    t0 = time.perf_counter()
    adas, drops = {}, {}
    try:
        for lname, layer in layers.items():
            if learn != "acts" and layer.weight_quantizer.enabled:
                adas[lname] = adaround.attach(layer)
            if learn != "weights":
                drops[lname] = qdrop.attach(layer, prob, gen, learn_scale=config.lr_act > 0,
                                            masks="fresh" if one_coin else "pool")
        fused = device.type in ("cpu", "cuda")  # one fused kernel per step: 2-3x cheaper than the loop on CPU
        opt_v = torch.optim.Adam([a.v for a in adas.values()], lr=config.lr_v, fused=fused) if adas else None
        scales = [d.scale for d in drops.values() if isinstance(d.scale, nn.Parameter)]
        opt_s = torch.optim.Adam(scales, lr=config.lr_act, fused=fused) if scales else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=iters, eta_min=0) if scales else None
        if coin is not None:
            coin.bind(drops)
            mixes = None
        else:  # quant_prob = 1: the quantized-prefix input; "two-coin": the earlier element-wise mix
            mixes = [qdrop.InputMix(prob, gen) for _ in x_q]
        bs = min(config.batch_size, n)
        steps = range(iters)
        if progress:
            steps = tqdm(steps, desc=f"reconstruct {name}", unit="it", leave=False)
        for step in steps:
            idx = torch.randperm(n, generator=gen, device=device)[:bs]
            if coin is not None:
                inputs = coin(x_q, x_fp, idx)
            else:
                inputs = [mix(a, b, idx) for a, b, mix in zip(x_q, x_fp, mixes)]
            rec = lp_loss(module(*inputs), y_fp[idx], p)
            if norm != 1.0:
                rec = rec * norm
            beta = adaround.beta_at(step, iters, config.warmup, *config.beta) if adas else None
            loss = rec
            reg = 0.0
            if beta is not None and config.lam > 0:
                reg_t = config.lam * sum(adaround.round_regularizer(a.v, beta) for a in adas.values())
                loss = rec + reg_t
                reg = float(reg_t.detach())
            for opt in (opt_v, opt_s):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (opt_v, opt_s):
                if opt is not None:
                    opt.step()
            if sched is not None:
                sched.step()
            hist.loss.append(float(rec.detach()))
            hist.reg.append(reg)
    finally:
        for lname, layer in layers.items():
            if lname in adas:
                hist.flipped[lname] = adaround.finish(layer)
            if lname in drops:
                qdrop.finish(layer)
    hist.seconds = time.perf_counter() - t0
    hist.after = _full_loss(module, x_q, y_fp, p, config.chunk)
    hist.after_mse = hist.after if p == 2 else _full_loss(module, x_q, y_fp, 2.0, config.chunk)
    return hist


# ------------------------------------------------------------------ the model
def reconstruct(qmodel: nn.Module, fp_model: nn.Module, images, config: ReconConfig = ReconConfig(),
                unit_p: dict[str, float] | None = None, units: Iterable[str] | None = None,
                progress: bool = False, resume: dict | None = None,
                checkpoint: Callable[[dict], None] | None = None) -> ReconHistory:
    """Reconstruct ``qmodel`` unit by unit against ``fp_model`` on ``images`` (in place).

    Args:
        qmodel: the quantized restartable detector, every quantizer calibrated (its starting scales: min-max,
            ``s_p*`` of a fixed p, or DetPTQ's per-unit ``s_p*``). Modified in place.
        fp_model: the FP detector with the same units (e.g. :func:`detptq_mini.quant.fold_bn` of the original);
            not modified.
        images: calibration images ``(N, 3, H, W)`` (or a data set with ``.images()``); labels are never used.
        config: a :class:`ReconConfig`.
        unit_p: ``{unit name: p}`` of the reconstruction loss (DetPTQ mode); units not in it use ``config.p``.
        units: reconstruct only these units (default: every unit with quantized layers); the others are
            left as they are but still run to produce the next inputs.
        progress: tqdm bars over the units and the steps.
        resume: a progress record that ``checkpoint`` received in an earlier call with the same arguments, with
            ``qmodel`` restored to its state at that moment (its ``state_dict``): the units that call finished
            are not reconstructed again, and the result equals an uninterrupted call's bit for bit (the times
            aside). A record of another reconstruction (config, ``unit_p`` or ``units`` differ) is an error.
        checkpoint: called after every reconstructed unit with the progress record (plain Python values: the
            stage, the finished units, their histories, the times); save it with ``qmodel.state_dict()`` to
            resume later.

    Returns:
        a :class:`ReconHistory` (per-unit loss curves, before/after losses, times).
    """
    check_unit_detector(qmodel, "qmodel")
    check_unit_detector(fp_model, "fp_model")
    if not isinstance(config, ReconConfig):
        raise ValueError(f"config must be a ReconConfig, got {type(config).__name__}")
    if tuple(u.name for u in qmodel.units) != tuple(u.name for u in fp_model.units):
        raise ValueError("qmodel and fp_model must have the same units (the quantized model of fp_model)")
    if not quant_layers(qmodel):
        raise ValueError("qmodel has no QuantConv2d layers: quantize it with quantize_model first")
    names = [u.name for u in qmodel.units]
    unit_p = dict(unit_p or {})
    unknown = [u for u in unit_p if u not in names]
    if unknown:
        raise ValueError(f"unit_p has {unknown} that are not units; allowed: {', '.join(names)}")
    for u, v in unit_p.items():
        unit_p[u] = check_number(f"unit_p[{u!r}]", v, 0, low_open=True)
    if units is None:
        todo = set(names)
    else:
        todo = {units} if isinstance(units, str) else set(units)
        bad = sorted(todo - set(names))
        if bad or not todo:
            raise ValueError(f"units={bad or list(todo)!r}: give unit names; allowed: {', '.join(names)}")
    if checkpoint is not None and not callable(checkpoint):
        raise ValueError(f"checkpoint must be None or a callable taking the progress record, got "
                         f"{type(checkpoint).__name__}")
    images = check_images(images, "images")
    device = next(qmodel.parameters()).device
    images = images.to(device)
    hist = ReconHistory(config)
    times = {"cache": 0.0, "optimise": 0.0}
    record = {"config": config.to_dict(), "unit_p": dict(unit_p), "units": sorted(todo), "stage": None,
              "done": [], "history": {}, "times": times, "before": None}
    if resume is not None:
        _check_resume(resume, record)
        hist.units = {n: UnitHistory(**{**h, "layers": tuple(h["layers"])}) for n, h in resume["history"].items()}
        times.update(resume["times"])
        record.update(stage=resume["stage"], done=list(resume["done"]), before=resume["before"])
    # the stages in order; a resumed run starts at its record's stage, skipping the units it finished
    order = ["both"] if config.stages == 1 else ["weights", "acts"]
    start = order.index(record["stage"]) if record["stage"] is not None else 0

    def one_pass(learn: Learn, inputs: str, desc: str) -> None:
        """Every unit in order: reconstruct it (``learn``) on its ``inputs`` ("quantized" prefix or "fp")."""
        if record["stage"] != learn:
            record["stage"], record["done"] = learn, []
        done = set(record["done"])
        walk = _walk(qmodel, fp_model, images, config.chunk, times)
        if progress:
            walk = tqdm(walk, desc=desc, unit="unit", total=len(names))
        for u, mod_q, x_q, x_fp, y_fp in walk:
            if u.name not in todo or u.name in done or not _unit_layers(mod_q, u.name):
                continue
            p = config.act_p if learn == "acts" else unit_p.get(u.name, config.p)
            with torch.enable_grad():
                h = reconstruct_unit(mod_q, x_fp if inputs == "fp" else x_q, x_fp, y_fp, p, config, u.name,
                                     learn=learn)
            times["optimise"] += h.seconds
            if learn == "acts":  # BRECQ's second stage: its curve and time join the first stage's history
                first = hist.units[u.name]
                first.act_loss, first.seconds = h.loss, first.seconds + h.seconds
            else:
                hist.units[u.name] = h
            if checkpoint is not None:
                record["done"].append(u.name)
                record["history"] = {n: asdict(v) for n, v in hist.units.items()}
                checkpoint(copy.deepcopy(record))  # a snapshot: the caller may keep it

    with eval_mode(qmodel), eval_mode(fp_model):  # gradients only inside reconstruct_unit
        if config.stages == 1:
            one_pass("both", "quantized", "reconstruction")
        else:  # BRECQ: the rounding of every unit with the activations in float, then the step sizes
            if record["before"] is None:
                record["before"] = _unit_losses(qmodel, fp_model, images, todo, unit_p, config, times)
            before = record["before"]
            if start == 0:
                with quant_state_kept(qmodel) as layers:
                    for layer in layers.values():
                        layer.set_quant_state(None, False)
                    one_pass("weights", "quantized", "reconstruction: weights")
            if config.act_iters > 0 and config.lr_act > 0:
                one_pass("acts", "fp", "reconstruction: step sizes")
            after = _unit_losses(qmodel, fp_model, images, todo, unit_p, config, times)
            for name, h in hist.units.items():  # the losses of the whole model, every element quantized
                h.before, (h.after, h.after_mse) = before[name][0], after[name]
    hist.seconds = {"cache": times["cache"], "optimise": times["optimise"],
                    "total": times["cache"] + times["optimise"]}
    return hist


def _check_resume(resume: dict, record: dict) -> None:
    """A ValueError unless ``resume`` is a progress record of the reconstruction that ``record`` starts."""
    need = ("config", "unit_p", "units", "stage", "done", "history", "times", "before")
    if not isinstance(resume, dict) or any(k not in resume for k in need):
        raise ValueError(f"resume must be a progress record that reconstruct passed to its checkpoint (a dict "
                         f"with {', '.join(need)}), or None")
    for key in ("config", "unit_p", "units"):
        if _plain(resume[key]) != _plain(record[key]):
            raise ValueError(f"resume is the progress of another reconstruction: its {key} is {resume[key]!r}, "
                             f"this call's {record[key]!r}")
    stages = ("both",) if record["config"]["stages"] == 1 else ("weights", "acts")
    if resume["stage"] not in (None, *stages):
        raise ValueError(f"resume has stage {resume['stage']!r}; allowed for this config: {stages}")
    units = set(record["units"])
    if not isinstance(resume["done"], list) or not set(resume["done"]) <= units or not isinstance(
            resume["history"], dict) or not set(resume["history"]) <= units:
        raise ValueError("resume's finished units and histories must name units of this reconstruction")


def _plain(x):
    """Tuples as lists, recursively: a record compares equal whatever container its values came back in."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _walk(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, chunk: int, times: dict):
    """Yield ``(unit, its quantized module, x_q, x_fp, y_fp)`` for every unit in order; after the consumer is done
    with a unit, its quantized output (with the unit as it is then) becomes the next units' quantized-prefix input.
    Cache time is added to ``times["cache"]``."""
    env_q = qmodel.capture(images, 0)
    env_fp = fp_model.capture(images, 0)
    for k, u in enumerate(qmodel.units):
        t = time.perf_counter()
        mod_q, mod_fp = qmodel.get_submodule(u.name), fp_model.get_submodule(u.name)
        x_q, x_fp = [env_q[n] for n in u.inputs], [env_fp[n] for n in u.inputs]
        y_fp = _apply(mod_fp, x_fp, chunk)
        times["cache"] += time.perf_counter() - t
        yield u, mod_q, x_q, x_fp, y_fp
        t = time.perf_counter()
        env_q[u.output] = _apply(mod_q, x_q, chunk)
        env_fp[u.output] = y_fp
        live = set(qmodel.live_names(k + 1)) if k + 1 < len(qmodel.units) else set()
        for env in (env_q, env_fp):
            for key in [key for key in env if key not in live]:
                del env[key]
        times["cache"] += time.perf_counter() - t


def _unit_losses(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, todo: set, unit_p: dict,
                 config: ReconConfig, times: dict) -> dict[str, tuple[float, float]]:
    """Per unit to reconstruct: its loss (own p, and p = 2) with the quantized-prefix input, every element quantized."""
    out = {}
    for u, mod_q, x_q, _, y_fp in _walk(qmodel, fp_model, images, config.chunk, times):
        if u.name in todo and _unit_layers(mod_q, u.name):
            p = unit_p.get(u.name, config.p)
            own = _full_loss(mod_q, x_q, y_fp, p, config.chunk)
            out[u.name] = (own, own if p == 2 else _full_loss(mod_q, x_q, y_fp, 2.0, config.chunk))
    return out
