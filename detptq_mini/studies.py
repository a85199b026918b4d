"""The labelled studies behind the method's choices: L_perf, the ODOL scale sweeps and the V ablation.

``l_perf`` measures what quantization costs the *task*: the detector's own training loss
(:func:`detptq_mini.train.detection_loss`) against ground-truth labels on a labelled split, and ``1 - mAP`` for
figures. It needs labels, so it is used only to *study* label-free proxies, never to quantize (method page,
section 4).

* :func:`scale_sweep` and :func:`sweep_agreement` are the paper's ODOL experiment: sweep one layer's scales and
  check how well each ODOL variant (:func:`detptq_mini.odol.odol`) finds L_perf's minimum (chapter 5);
* :func:`rounding_ablation` is the paper's V ablation: does learned rounding (AdaRound) move the best p of a
  layer? (chapter 7; ``benchmarks/rounding_ablation.py``).

Nothing in the quantization chain imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_choice, check_images, check_int, check_ps
from .data import ShapesDataset
from .evaluate import evaluate_model
from .lp import P_DEFAULT, LayerScales, minmax_scale
from .model import check_unit_detector
from .odol import OdolConfig, odol
from .quant import (collect_activations, eval_mode, qparams_from_range, quant_state_kept, quantization_off,
                    select_layers)
from .reconstruction import ReconConfig, reconstruct_unit
from .train import detection_loss

__all__ = ["l_perf", "l_perf_map", "ODOL_VARIANTS", "spearman", "scale_sweep", "sweep_agreement", "RoundingAblation",
           "rounding_ablation"]


# ---------------------------------------------------------------------- L_perf
def _check_dataset(dataset) -> None:
    if not isinstance(dataset, ShapesDataset):
        raise ValueError(f"dataset must be a labelled ShapesDataset, got {type(dataset).__name__}")


def l_perf(model: nn.Module, dataset: ShapesDataset, batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean detection loss of ``model`` against the labels of ``dataset`` (lower is better).

    The mean is over images (each batch's loss weighted by its size), so the value does not depend on
    ``batch_size``.
    """
    _check_dataset(dataset)
    total = 0.0
    with eval_mode(model):
        for s in range(0, len(dataset), batch_size):
            x = dataset.images(s, s + batch_size).to(device)
            targets = [dataset.targets[i] for i in range(s, s + len(x))]
            total += float(detection_loss(model(x), targets)["loss"]) * len(x)
    return total / len(dataset)


def l_perf_map(model: nn.Module, dataset: ShapesDataset, device: str | torch.device = "cpu") -> float:
    """``1 - mAP50:95`` of ``model`` on ``dataset`` (the mAP view of L_perf, for figures)."""
    _check_dataset(dataset)
    return 1.0 - evaluate_model(model, dataset, device=device)["map"]


# ------------------------------------------------------ the scale-sweep study
ODOL_VARIANTS: tuple[tuple[str, str], ...] = (("kl", "l1"), ("kl", "iou"), ("l2", "l1"), ("l2", "iou"))


def _ranks(v: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    v = v.double()
    order = v.argsort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    for value in v.unique():  # average the ranks of ties
        tie = v == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Spearman's rank correlation of two equally long sequences (0.0 if either is constant)."""
    ra, rb = _ranks(torch.as_tensor(a)), _ranks(torch.as_tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


@torch.no_grad()
def scale_sweep(qmodel: nn.Module, layer: str, dataset: ShapesDataset, ratios: Sequence[float],
                variants: Sequence[tuple[str, str]] = ODOL_VARIANTS, config: OdolConfig = OdolConfig()) -> dict:
    """Sweep one layer's scales and record ``L_perf`` and every ODOL variant (the paper's ODOL experiment).

    Only ``layer`` is quantized (its weight and input quantizers, at their configured bits); every other
    quantizer is off (FP). At ratio ``r`` the layer's scales are ``r`` times its min-max scales (weights per
    output channel, symmetric; the input activation's range ``(r lo, r hi)``), so ``r = 1`` is min-max. The
    FP prefix before the layer's unit is computed once (``capture``) and every candidate runs only the rest.

    Args:
        qmodel: a quantized detector (see :func:`detptq_mini.quant.quantize_model`); its quantization state is
            restored afterwards.
        layer: the quantized conv to sweep (a name of ``quant_layers(qmodel)``).
        dataset: labelled images: ``L_perf`` uses their labels; ODOL uses only the images.
        ratios: the candidate ratios ``r > 0``.
        variants: ``(cls, loc)`` pairs of ODOL to record.
        config: the rest of the ODOL variant (``fg``, ``lam``, ``fg_threshold``); each pair of ``variants``
            replaces its ``cls`` and ``loc``.

    Returns:
        ``{"ratios": [...], "l_perf": [...], "odol": {"kl+l1": [...], ...}, "fp_l_perf": float}``.
    """
    _check_dataset(dataset)
    check_unit_detector(qmodel, "qmodel")
    q = select_layers(qmodel, layer, "layer")[layer]
    ratios = [float(r) for r in ratios]
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"ratios={ratios!r} must be a non-empty sequence of numbers > 0")
    if not isinstance(config, OdolConfig):
        raise ValueError(f"config must be an OdolConfig, got {type(config).__name__}")
    configs = {f"{c}+{l}": replace(config, cls=c, loc=l) for c, l in variants}
    wq, aq = q.weight_quantizer, q.input_quantizer
    x, targets = dataset.images(), dataset.targets
    act = collect_activations(qmodel, x, [layer])[layer]
    lo, hi = float(act.min()), float(act.max())
    w_scale, _ = minmax_scale(q.conv.weight.detach(), wq.bits, axis=wq.axis, symmetric=wq.symmetric)
    w_saved = (wq.scale.clone(), wq.zero_point.clone(), aq.scale.clone(), aq.zero_point.clone(),
               bool(wq.calibrated), bool(aq.calibrated))
    with eval_mode(qmodel), quant_state_kept(qmodel) as layers:
        try:
            for m in layers.values():
                m.set_quant_state(False, False)
            unit = qmodel.unit_of(layer)
            cache = qmodel.capture(x, unit)
            fp_out = qmodel.forward_from(unit, cache)
            fp_l_perf = float(detection_loss(fp_out, targets)["loss"])
            q.set_quant_state(True, True)
            out = {"ratios": ratios, "l_perf": [], "odol": {v: [] for v in configs}, "fp_l_perf": fp_l_perf}
            for r in ratios:
                wq.set_qparams(w_scale * r, torch.zeros_like(wq.zero_point))
                aq.set_qparams(*qparams_from_range(r * lo, r * hi, aq.bits, aq.symmetric))
                q_out = qmodel.forward_from(unit, cache)
                out["l_perf"].append(float(detection_loss(q_out, targets)["loss"]))
                for v, cfg in configs.items():
                    out["odol"][v].append(float(odol(fp_out, q_out, config=cfg)))
        finally:
            wq.scale.copy_(w_saved[0]); wq.zero_point.copy_(w_saved[1])  # noqa: E702
            aq.scale.copy_(w_saved[2]); aq.zero_point.copy_(w_saved[3])  # noqa: E702
            wq.calibrated.fill_(w_saved[4]); aq.calibrated.fill_(w_saved[5])  # noqa: E702
    return out


def sweep_agreement(sweeps: dict[str, dict]) -> dict[str, dict[str, float]]:
    """How well each ODOL variant tracks ``L_perf`` over the sweeps of several layers.

    For each variant: ``argmin_distance``, the mean over layers of ``|r*_ODOL - r*_Lperf|`` (in ratio units,
    i.e. relative to the min-max scale), and ``spearman``, the mean rank correlation of the two curves.
    """
    variants = next(iter(sweeps.values()))["odol"].keys()
    result = {}
    for v in variants:
        dist, corr = [], []
        for sw in sweeps.values():
            r = sw["ratios"]
            best_perf = r[min(range(len(r)), key=lambda i: sw["l_perf"][i])]
            best_odol = r[min(range(len(r)), key=lambda i: sw["odol"][v][i])]
            dist.append(abs(best_odol - best_perf))
            corr.append(spearman(sw["odol"][v], sw["l_perf"]))
        result[v] = {"argmin_distance": sum(dist) / len(dist), "spearman": sum(corr) / len(corr)}
    return result


# ------------------------------------------------------------------ the V ablation
@dataclass
class RoundingAblation:
    """ODOL per candidate p of each layer, with the scale alone and with the scale plus learned rounding.

    Attributes:
        scale: ``{layer: {p: ODOL}}`` with ``s_p*`` and round-to-nearest.
        rounding: ``{layer: {p: ODOL}}`` with ``s_p*`` and a short AdaRound of the layer (Lp loss with that p).
        config: the settings (JSON-ready).
    """

    scale: dict[str, dict[float, float]]
    rounding: dict[str, dict[float, float]]
    config: dict

    def best(self, kind: str = "scale") -> dict[str, float]:
        """The p with the lowest ODOL per layer (``kind`` ``"scale"`` or ``"rounding"``)."""
        check_choice("kind", kind, ("scale", "rounding"))
        table = self.scale if kind == "scale" else self.rounding
        return {layer: min(row, key=row.get) for layer, row in table.items()}

    def moved(self) -> dict[str, bool]:
        """Per layer: does learned rounding move the best p?"""
        a, b = self.best("scale"), self.best("rounding")
        return {layer: a[layer] != b[layer] for layer in a}


def rounding_ablation(qmodel: nn.Module, images, scales: dict[str, LayerScales], layers: Sequence[str],
                      ps: Iterable[float] = P_DEFAULT, iters: int = 200, config: ReconConfig | None = None,
                      progress: bool = False) -> RoundingAblation:
    """The paper's V ablation: does adding learned rounding to the p search change the best p?

    One layer at a time, everything else FP (the "quantize this layer" view of DetPTQ's selection): for each
    ``p``, quantize the layer with ``s_p*`` and measure ODOL (KL + L1) on ``images``; then start again from
    ``s_p*``, run ``iters`` steps of AdaRound on that layer alone (inputs: the layer's FP inputs; target:
    its FP output; loss: Lp with the same p; step sizes fixed, every element quantized) and measure ODOL
    again. ``qmodel`` is restored afterwards (weights, scales, quantizer states, train/eval modes).

    Args:
        qmodel: a quantized restartable detector whose quantizers are calibrated or covered by ``scales``.
        images: calibration images.
        scales: :func:`~detptq_mini.lp.search_model_scales` output covering ``ps`` for ``layers``.
        layers: the quantized layers to study.
        ps: candidate p.
        iters: AdaRound steps per (layer, p).
        config: reconstruction settings (``iters`` is taken from the argument; ``quant_prob`` is set to 1
            and ``lr_act`` to 0).
        progress: a tqdm bar over the layers.
    """
    check_unit_detector(qmodel, "qmodel")
    ps = check_ps(ps)
    layers = list(select_layers(qmodel, layers))
    if not layers:
        raise ValueError("layers=[]: give at least one quantized layer name")
    for n in layers:
        if n not in scales or any(p not in scales[n].weight or p not in scales[n].act for p in ps):
            raise ValueError(f"scales lacks layer {n!r} or one of ps={list(ps)}: search them first")
    base = ReconConfig() if config is None else config
    cfg = replace(base, iters=check_int("iters", iters, 1), quant_prob=1.0, lr_act=0.0)
    images = check_images(images, "images").to(next(qmodel.parameters()).device)
    saved = {k: v.clone() for k, v in qmodel.state_dict().items()}
    out_scale: dict[str, dict[float, float]] = {}
    out_round: dict[str, dict[float, float]] = {}
    with eval_mode(qmodel, no_grad=False), quant_state_kept(qmodel) as all_layers:
        try:
            with torch.no_grad(), quantization_off(qmodel):
                fp_out = qmodel(images)
            for name in tqdm(layers, desc="rounding ablation", unit="layer", disable=not progress):
                layer = all_layers[name]
                unit = qmodel.unit_of(name)
                for m in all_layers.values():
                    m.set_quant_state(False, False)
                with torch.no_grad():
                    cache = qmodel.capture(images, unit)
                    x_in = []
                    hook = layer.register_forward_pre_hook(lambda mod, args: x_in.append(args[0].detach()))
                    qmodel.forward_from(unit, cache)
                    hook.remove()
                    x_fp = x_in[0]
                    y_fp = layer(x_fp)
                weight0 = layer.conv.weight.detach().clone()
                layer.set_quant_state(True, True)
                out_scale[name], out_round[name] = {}, {}
                for p in ps:
                    layer.weight_quantizer.set_qparams(*scales[name].weight[p])
                    layer.input_quantizer.set_qparams(*scales[name].act[p])
                    with torch.no_grad():
                        out_scale[name][p] = float(odol(fp_out, qmodel.forward_from(unit, cache)))
                    with torch.enable_grad():
                        reconstruct_unit(layer, [x_fp], [x_fp], y_fp, p, cfg, name)
                    with torch.no_grad():
                        out_round[name][p] = float(odol(fp_out, qmodel.forward_from(unit, cache)))
                        layer.conv.weight.copy_(weight0)
        finally:
            qmodel.load_state_dict(saved)
    config_out = {"layers": layers, "ps": list(ps), "iters": iters, "images": int(images.shape[0]),
                  "recon": cfg.to_dict()}
    return RoundingAblation(out_scale, out_round, config_out)
