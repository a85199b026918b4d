"""Task losses for studying quantization: the labelled L_perf and the label-free ODOL.

``l_perf`` measures what quantization costs the *task*: the detector's own
training loss (:func:`detptq_mini.train.detection_loss`) against ground-truth
labels on a labelled split, and ``1 - mAP`` for figures. It needs labels, so it
is used only to *study* label-free proxies, never to quantize (METHOD.md s. 4).

``odol`` (Object Detection Output Loss, DetPTQ [paper]) is such a proxy: a
distance between the dense head outputs of the FP and the quantized detector,
``L_cls + lam * L_loc`` with KL or L2 for classification and L1 or IoU for
localization (the paper's choice: KL + L1), pinned as METHOD.md s. 4 [ours].
``odol_terms`` returns the two terms separately.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_choice, check_number
from .data import ShapesDataset
from .model import STRIDES, DenseOutputs, distances_to_boxes, flatten_levels, make_anchors
from .train import detection_loss

__all__ = ["l_perf", "l_perf_map", "odol", "odol_terms", "bernoulli_kl_from_logits", "elementwise_iou", "ODOL_VARIANTS",
           "spearman", "scale_sweep", "sweep_agreement"]


def _check_dataset(dataset) -> None:
    if not isinstance(dataset, ShapesDataset):
        raise ValueError(f"dataset must be a labelled ShapesDataset, got {type(dataset).__name__}")


@torch.no_grad()
def l_perf(model: nn.Module, dataset: ShapesDataset, batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean detection loss of ``model`` against the labels of ``dataset`` (lower is better).

    The mean is over images (each batch's loss weighted by its size), so the value does not depend on
    ``batch_size``.
    """
    _check_dataset(dataset)
    was_training = model.training
    model.eval()
    total = 0.0
    for s in range(0, len(dataset), batch_size):
        x = dataset.images(s, s + batch_size).to(device)
        targets = [dataset.targets[i] for i in range(s, s + len(x))]
        total += float(detection_loss(model(x), targets)["loss"]) * len(x)
    model.train(was_training)
    return total / len(dataset)


def l_perf_map(model: nn.Module, dataset: ShapesDataset, device: str | torch.device = "cpu") -> float:
    """``1 - mAP50:95`` of ``model`` on ``dataset`` (the mAP view of L_perf, for figures)."""
    from .evaluate import evaluate_model

    _check_dataset(dataset)
    return 1.0 - evaluate_model(model, dataset, device=device)["map"]


# ------------------------------------------------------------------------ ODOL
ClsMode = Literal["kl", "l2"]
LocMode = Literal["l1", "iou"]
FgMode = Literal["soft", "hard"]
Reduction = Literal["mean", "sum"]


def _check_outputs(fp_out: DenseOutputs, q_out: DenseOutputs) -> None:
    """Both outputs must be DenseOutputs-like with the same levels and shapes, finite float tensors."""
    for name, out in (("fp_out", fp_out), ("q_out", q_out)):
        if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out, "cls") and hasattr(out, "box")):
            raise ValueError(f"{name} must be a DenseOutputs (cls, box), got {type(out).__name__}")
        if len(out.cls) == 0 or len(out.cls) != len(out.box):
            raise ValueError(f"{name} must have one class and one box tensor per level, "
                             f"got {len(out.cls)} class and {len(out.box)} box tensors")
    if len(fp_out.cls) != len(q_out.cls):
        raise ValueError(f"fp_out has {len(fp_out.cls)} levels but q_out has {len(q_out.cls)}")
    k = fp_out.cls[0].shape[1] if fp_out.cls[0].dim() == 4 else None
    for lvl, (cf, bf, cq, bq) in enumerate(zip(fp_out.cls, fp_out.box, q_out.cls, q_out.box)):
        for name, t in (("fp_out.cls", cf), ("fp_out.box", bf), ("q_out.cls", cq), ("q_out.box", bq)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 4:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}[{lvl}] must be a float tensor (B, C, H, W), got {got}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}[{lvl}] contains NaN or inf")
        if cf.shape != cq.shape or bf.shape != bq.shape:
            raise ValueError(f"level {lvl}: fp_out and q_out differ in shape: cls {tuple(cf.shape)} vs "
                             f"{tuple(cq.shape)}, box {tuple(bf.shape)} vs {tuple(bq.shape)}")
        if bf.shape[1] != 4:
            raise ValueError(f"box[{lvl}] must have 4 channels (l, t, r, b), got shape {tuple(bf.shape)}")
        if cf.shape[1] != k or cf.shape[0] != fp_out.cls[0].shape[0]:
            raise ValueError(f"cls[{lvl}] has shape {tuple(cf.shape)}; every level needs the same batch and "
                             f"number of classes as level 0 {tuple(fp_out.cls[0].shape[:2])}")
        if (bf.shape[0],) + tuple(bf.shape[2:]) != (cf.shape[0],) + tuple(cf.shape[2:]):
            raise ValueError(f"level {lvl}: box {tuple(bf.shape)} and cls {tuple(cf.shape)} differ in batch or H, W")


def bernoulli_kl_from_logits(z_p: Tensor, z_q: Tensor) -> Tensor:
    """Elementwise Bernoulli ``KL(p || q)`` for ``p = sigmoid(z_p)``, ``q = sigmoid(z_q)`` (same shapes).

    ``p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))`` with every log taken as a log-sigmoid of a
    logit (``log q = logsigmoid(z_q)``, ``log(1 - q) = logsigmoid(-z_q)``): no ``log(0)`` for saturated
    probabilities, and identical logits give exactly 0. Rounding can leave tiny negatives; they are clamped to 0.
    """
    p = torch.sigmoid(z_p)
    kl = p * (F.logsigmoid(z_p) - F.logsigmoid(z_q)) + (1 - p) * (F.logsigmoid(-z_p) - F.logsigmoid(-z_q))
    return kl.clamp_min(0.0)


def elementwise_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of matched pairs of xyxy boxes ``a[..., i]`` and ``b[..., i]``: shapes ``(..., 4)`` -> ``(...)``.

    ``torchvision.ops.box_iou`` is pairwise (N x M); here box ``i`` is compared with box ``i`` only.
    The union is floored at ``eps`` (squared pixels) so two empty boxes give IoU 0, not NaN; identical
    non-empty boxes give exactly 1.
    """
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    return inter / (area_a + area_b - inter).clamp_min(eps)


def odol_terms(fp_out: DenseOutputs, q_out: DenseOutputs, cls: ClsMode = "kl", loc: LocMode = "l1",
               fg: FgMode = "soft", lam: float = 1.0, fg_thresh: float = 0.25, eps: float = 1e-6,
               reduction: Reduction = "mean", strides: Sequence[int] = STRIDES) -> dict[str, Tensor]:
    """The two ODOL terms and their sum: ``{"cls": L_cls, "loc": L_loc, "total": L_cls + lam * L_loc}``.

    See :func:`odol` for the definition and the arguments; every value is a scalar tensor.
    """
    check_choice("cls", cls, ClsMode)
    check_choice("loc", loc, LocMode)
    check_choice("fg", fg, FgMode)
    check_choice("reduction", reduction, Reduction)
    check_number("lam", lam, 0)
    check_number("fg_thresh", fg_thresh, 0, 1, low_open=True, high_open=True)
    check_number("eps", eps, 0, low_open=True)
    _check_outputs(fp_out, q_out)
    if loc == "iou" and len(strides) != len(fp_out.cls):
        raise ValueError(f"strides={tuple(strides)} has {len(strides)} entries but the outputs have "
                         f"{len(fp_out.cls)} levels; loc='iou' decodes each level's ltrb distances at its stride, "
                         "so pass one stride per level; for box outputs of another form (e.g. the anchor deltas "
                         "of detptq_mini.adapter's RetinaNet, packed as one level) use loc='l1'")

    z_fp, b_fp = (t.detach() for t in flatten_levels(fp_out))  # (B, A, K), (B, A, 4): the target
    z_q, b_q = flatten_levels(q_out)
    z_q, b_q = z_q.to(z_fp.dtype), b_q.to(b_fp.dtype)
    p_fp = torch.sigmoid(z_fp)

    # L_cls: per location, the sum over classes; then the mean (or sum) over the B * A locations.
    if cls == "kl":
        per_loc = bernoulli_kl_from_logits(z_fp, z_q).sum(-1)
    else:
        per_loc = (p_fp - torch.sigmoid(z_q)).pow(2).sum(-1)
    l_cls = per_loc.mean() if reduction == "mean" else per_loc.sum()

    # Foreground weights w_i from the FP detector's most confident class.
    w = p_fp.amax(-1)  # (B, A)
    if fg == "hard":
        w = (w > fg_thresh).to(w.dtype)

    # L_loc: per location, the L1 distance of the ltrb vectors (stride units) or 1 - IoU of the decoded boxes.
    if loc == "l1":
        d = (b_fp - b_q).abs().sum(-1)
    else:
        centres, s = make_anchors([tuple(c.shape[-2:]) for c in fp_out.cls], strides, device=b_fp.device)
        centres, s = centres.to(b_fp.dtype), s.to(b_fp.dtype)
        d = 1 - elementwise_iou(distances_to_boxes(b_fp, centres, s), distances_to_boxes(b_q, centres, s), eps)
    w_sum = w.sum()
    num = (w * d).sum()
    if reduction == "sum":
        l_loc = num
    elif w_sum > 0:
        l_loc = num / w_sum
    else:  # no foreground location: nothing to localize, the term is 0 (kept in the graph for backward)
        l_loc = num * 0.0
    return {"cls": l_cls, "loc": l_loc, "total": l_cls + lam * l_loc}


def odol(fp_out: DenseOutputs, q_out: DenseOutputs, cls: ClsMode = "kl", loc: LocMode = "l1",
         fg: FgMode = "soft", lam: float = 1.0, fg_thresh: float = 0.25, eps: float = 1e-6,
         reduction: Reduction = "mean", strides: Sequence[int] = STRIDES) -> Tensor:
    """Object Detection Output Loss: a label-free distance from the FP detector's outputs to the quantized ones.

    ``ODOL = L_cls + lam * L_loc`` on the dense, pre-NMS head outputs of every level [paper], pinned as in
    METHOD.md s. 4 [ours]. With ``A`` the locations of all levels, ``K`` the classes,
    ``p_fp, p_q = sigmoid(logits)`` of shape ``(B, A, K)`` and ``b_fp, b_q`` the ltrb distances in stride
    units ``(B, A, 4)`` (the decoder's input), and ``i`` running over the ``B * A`` locations:

    ========  =====================================================================================
    term      definition
    ========  =====================================================================================
    ``kl``    ``L_cls = mean_i sum_c KL(p_fp(i,c) || p_q(i,c))``, Bernoulli KL, from the logits
    ``l2``    ``L_cls = mean_i sum_c (p_fp(i,c) - p_q(i,c))^2``
    ``l1``    ``L_loc = sum_i w_i |b_fp,i - b_q,i|_1 / sum_i w_i``
    ``iou``   ``L_loc = sum_i w_i (1 - IoU(box_fp,i, box_q,i)) / sum_i w_i``, boxes decoded to pixels
    ``soft``  ``w_i = max_c p_fp(i, c)``
    ``hard``  ``w_i = 1`` if ``max_c p_fp(i, c) > fg_thresh`` else ``0``
    ========  =====================================================================================

    The paper found ``kl`` + ``l1`` (the defaults) to track L_perf best. If ``sum_i w_i = 0`` (no
    foreground, possible with ``fg="hard"``) then ``L_loc = 0``. ``fp_out`` is the target: it is detached,
    so gradients flow only into ``q_out``.

    Args:
        fp_out: outputs of the FP detector, a :class:`~detptq_mini.model.DenseOutputs` with per level class
            logits ``(B, K, H_l, W_l)`` and ltrb distances ``(B, 4, H_l, W_l)``.
        q_out: outputs of the quantized detector, the same structure and shapes.
        cls: classification distance, ``"kl"`` or ``"l2"``.
        loc: localization distance, ``"l1"`` or ``"iou"``.
        fg: foreground weights, ``"soft"`` or ``"hard"``.
        lam: weight ``lambda >= 0`` of ``L_loc``.
        fg_thresh: threshold of ``fg="hard"``, in (0, 1).
        eps: floor of the IoU's union (squared pixels), so two empty boxes give IoU 0, not NaN.
        reduction: ``"mean"`` (the pinned definition) or ``"sum"``: ``L_cls`` summed instead of averaged over
            locations and ``L_loc`` left as the weighted sum ``sum_i w_i d_i`` (not divided by ``sum_i w_i``),
            e.g. to accumulate over calibration batches.
        strides: the stride of each level, used only to decode boxes for ``loc="iou"`` (the IoU does not
            depend on them, but the decoded boxes do); defaults to the shipped detector's ``(8, 16, 32)``.

    Returns:
        The scalar ``ODOL`` (use :func:`odol_terms` for ``L_cls`` and ``L_loc`` separately).

    Raises:
        ValueError: an unknown mode, ``lam`` negative or not finite, ``fg_thresh`` outside (0, 1), outputs
            whose structure or shapes differ, or a NaN/inf in them.
    """
    return odol_terms(fp_out, q_out, cls, loc, fg, lam, fg_thresh, eps, reduction, strides)["total"]


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
                variants: Sequence[tuple[str, str]] = ODOL_VARIANTS, fg: FgMode = "soft", lam: float = 1.0) -> dict:
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

    Returns:
        ``{"ratios": [...], "l_perf": [...], "odol": {"kl+l1": [...], ...}, "fp_l_perf": float}``.
    """
    from .lp import minmax_scale
    from .quant import collect_activations, qparams_from_range, quant_layers

    _check_dataset(dataset)
    layers = quant_layers(qmodel)
    if layer not in layers:
        raise ValueError(f"layer={layer!r} is not a quantized conv; allowed: {', '.join(layers)}")
    ratios = [float(r) for r in ratios]
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"ratios={ratios!r} must be a non-empty sequence of numbers > 0")
    for c, l in variants:
        check_choice("cls", c, ClsMode)
        check_choice("loc", l, LocMode)
    q = layers[layer]
    wq, aq = q.weight_quantizer, q.input_quantizer
    x, targets = dataset.images(), dataset.targets
    act = collect_activations(qmodel, x, [layer])[layer]
    lo, hi = float(act.min()), float(act.max())
    w_scale, _ = minmax_scale(q.conv.weight.detach(), wq.bits, axis=wq.axis, symmetric=wq.symmetric)
    saved = {n: (m.weight_quantizer.enabled, m.input_quantizer.enabled) for n, m in layers.items()}
    w_saved = (wq.scale.clone(), wq.zero_point.clone(), aq.scale.clone(), aq.zero_point.clone(),
               bool(wq.calibrated), bool(aq.calibrated))
    was_training = qmodel.training
    qmodel.eval()
    try:
        for m in layers.values():
            m.set_quant_state(False, False)
        unit = qmodel.unit_of(layer)
        cache = qmodel.capture(x, unit)
        fp_out = qmodel.forward_from(unit, cache)
        fp_l_perf = float(detection_loss(fp_out, targets)["loss"])
        q.set_quant_state(True, True)
        out = {"ratios": ratios, "l_perf": [], "odol": {f"{c}+{l}": [] for c, l in variants}, "fp_l_perf": fp_l_perf}
        for r in ratios:
            wq.set_qparams(w_scale * r, torch.zeros_like(wq.zero_point))
            aq.set_qparams(*qparams_from_range(r * lo, r * hi, aq.bits, aq.symmetric))
            q_out = qmodel.forward_from(unit, cache)
            out["l_perf"].append(float(detection_loss(q_out, targets)["loss"]))
            for c, l in variants:
                out["odol"][f"{c}+{l}"].append(float(odol(fp_out, q_out, cls=c, loc=l, fg=fg, lam=lam)))
    finally:
        for n, (w_on, a_on) in saved.items():
            layers[n].set_quant_state(w_on, a_on)
        with torch.no_grad():
            wq.scale.copy_(w_saved[0]); wq.zero_point.copy_(w_saved[1])  # noqa: E702
            aq.scale.copy_(w_saved[2]); aq.zero_point.copy_(w_saved[3])  # noqa: E702
            wq.calibrated.fill_(w_saved[4]); aq.calibrated.fill_(w_saved[5])  # noqa: E702
        qmodel.train(was_training)
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
