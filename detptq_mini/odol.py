"""ODOL, the label-free task loss of DetPTQ (method page, section 4).

``odol`` (Object Detection Output Loss, DetPTQ [paper]) is a distance between the dense head outputs of the FP
and the quantized detector, ``L_cls + lam * L_loc`` with KL or L2 for classification and L1 or IoU for
localization (the paper's choice: KL + L1), pinned as on the method page, section 4 [ours]. ``odol_terms``
returns the two terms separately. An :class:`OdolConfig` names one variant (the modes, ``lam`` and the
threshold of hard foreground weights); ``odol``, DetPTQ's selection of p and the studies share it.
:class:`ChunkedOdol` is ODOL over calibration images that come in chunks (several forwards): exactly ``odol``
for one chunk, the sums combined with the normalisers of the whole set for several.

No labels are used anywhere here; the labelled task loss ``L_perf`` that ODOL stands in for, and the study of
how well it does, are in :mod:`detptq_mini.studies`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_choice, check_number
from .model import STRIDES, DenseOutputs, distances_to_boxes, flatten_levels, make_anchors

__all__ = ["OdolConfig", "ChunkedOdol", "odol", "odol_terms", "bernoulli_kl_from_logits", "elementwise_iou",
           "ClsMode", "LocMode", "FgMode"]


# ------------------------------------------------------------------------ ODOL
ClsMode = Literal["kl", "l2"]
LocMode = Literal["l1", "iou"]
FgMode = Literal["soft", "hard"]
Reduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class OdolConfig:
    """One ODOL variant (see :func:`odol` for the definitions); the defaults are the paper's KL + L1, soft weights.

    Attributes:
        cls: classification distance, ``"kl"`` or ``"l2"``.
        loc: localization distance, ``"l1"`` or ``"iou"``.
        fg: foreground weights, ``"soft"`` or ``"hard"``.
        lam: weight ``lambda >= 0`` of ``L_loc``.
        fg_threshold: the threshold of ``fg="hard"``, in (0, 1).

    Raises:
        ValueError: an unknown mode, ``lam`` negative or not finite, ``fg_threshold`` outside (0, 1).
    """

    cls: ClsMode = "kl"
    loc: LocMode = "l1"
    fg: FgMode = "soft"
    lam: float = 1.0
    fg_threshold: float = 0.25

    def __post_init__(self):
        check_choice("cls", self.cls, ClsMode)
        check_choice("loc", self.loc, LocMode)
        check_choice("fg", self.fg, FgMode)
        object.__setattr__(self, "lam", check_number("lam", self.lam, 0))
        object.__setattr__(self, "fg_threshold",
                           check_number("fg_threshold", self.fg_threshold, 0, 1, low_open=True, high_open=True))


def _config(config: OdolConfig | None, cls, loc, fg, lam, fg_thresh) -> OdolConfig:
    """The variant of a call: ``config``, or one built from the keyword arguments (not both)."""
    given = {k: v for k, v in (("cls", cls), ("loc", loc), ("fg", fg), ("lam", lam), ("fg_thresh", fg_thresh))
             if v is not None}
    if config is not None:
        if not isinstance(config, OdolConfig):
            raise ValueError(f"config must be an OdolConfig, got {type(config).__name__}")
        if given:
            raise ValueError(f"pass either config or the keyword arguments cls, loc, fg, lam, fg_thresh, not both "
                             f"(got config and {', '.join(given)})")
        return config
    if fg_thresh is not None:  # checked under its own name (the config calls it fg_threshold)
        check_number("fg_thresh", fg_thresh, 0, 1, low_open=True, high_open=True)
    return OdolConfig(**{("fg_threshold" if k == "fg_thresh" else k): v for k, v in given.items()})


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


def odol_terms(fp_out: DenseOutputs, q_out: DenseOutputs, cls: ClsMode | None = None, loc: LocMode | None = None,
               fg: FgMode | None = None, lam: float | None = None, fg_thresh: float | None = None, eps: float = 1e-6,
               reduction: Reduction = "mean", strides: Sequence[int] = STRIDES, *,
               config: OdolConfig | None = None) -> dict[str, Tensor]:
    """The two ODOL terms and their sum: ``{"cls": L_cls, "loc": L_loc, "total": L_cls + lam * L_loc}``.

    See :func:`odol` for the definition and the arguments; every value is a scalar tensor.
    """
    config = _config(config, cls, loc, fg, lam, fg_thresh)
    cls, loc, fg, lam, fg_thresh = config.cls, config.loc, config.fg, config.lam, config.fg_threshold
    check_choice("reduction", reduction, Reduction)
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


def odol(fp_out: DenseOutputs, q_out: DenseOutputs, cls: ClsMode | None = None, loc: LocMode | None = None,
         fg: FgMode | None = None, lam: float | None = None, fg_thresh: float | None = None, eps: float = 1e-6,
         reduction: Reduction = "mean", strides: Sequence[int] = STRIDES, *,
         config: OdolConfig | None = None) -> Tensor:
    """Object Detection Output Loss: a label-free distance from the FP detector's outputs to the quantized ones.

    ``ODOL = L_cls + lam * L_loc`` on the dense, pre-NMS head outputs of every level [paper], pinned as on the
    method page, section 4 [ours]. With ``A`` the locations of all levels, ``K`` the classes,
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
        cls: classification distance, ``"kl"`` (the default) or ``"l2"``.
        loc: localization distance, ``"l1"`` (the default) or ``"iou"``.
        fg: foreground weights, ``"soft"`` (the default) or ``"hard"``.
        lam: weight ``lambda >= 0`` of ``L_loc`` (default 1.0).
        fg_thresh: threshold of ``fg="hard"``, in (0, 1) (default 0.25).
        eps: floor of the IoU's union (squared pixels), so two empty boxes give IoU 0, not NaN.
        reduction: ``"mean"`` (the pinned definition) or ``"sum"``: ``L_cls`` summed instead of averaged over
            locations and ``L_loc`` left as the weighted sum ``sum_i w_i d_i`` (not divided by ``sum_i w_i``),
            e.g. to accumulate over calibration batches.
        strides: the stride of each level, used only to decode boxes for ``loc="iou"`` (the IoU does not
            depend on them, but the decoded boxes do); defaults to the shipped detector's ``(8, 16, 32)``.
        config: the variant as an :class:`OdolConfig`, instead of ``cls``, ``loc``, ``fg``, ``lam`` and
            ``fg_thresh`` (giving both is an error).

    Returns:
        The scalar ``ODOL`` (use :func:`odol_terms` for ``L_cls`` and ``L_loc`` separately).

    Raises:
        ValueError: an unknown mode, ``lam`` negative or not finite, ``fg_thresh`` outside (0, 1), ``config``
            together with a keyword argument of the variant, outputs whose structure or shapes differ, or a NaN/inf
            in them.
    """
    return odol_terms(fp_out, q_out, cls, loc, fg, lam, fg_thresh, eps, reduction, strides, config=config)["total"]


class ChunkedOdol:
    """ODOL of quantized outputs against fixed FP outputs, over calibration images that come in chunks.

    With one chunk it is exactly :func:`odol`. With several (one forward per chunk, e.g. to bound memory) each
    chunk's sums (``reduction="sum"``) are added and divided by the normalisers of the whole set: ``L_cls`` by
    the number of locations of all chunks, ``L_loc`` by the sum of the foreground weights of all chunks (0 if
    that sum is 0), so that the value is ODOL on the concatenated chunks up to float rounding. The normalisers
    depend only on the FP outputs and are computed once.

    Args:
        fp_outs: the FP detector's outputs, one :class:`~detptq_mini.model.DenseOutputs` per chunk.
        config: the ODOL variant.

    Raises:
        ValueError: no chunks, or ``config`` not an :class:`OdolConfig`.
    """

    def __init__(self, fp_outs: Sequence[DenseOutputs], config: OdolConfig = OdolConfig()):
        if not isinstance(config, OdolConfig):
            raise ValueError(f"config must be an OdolConfig, got {type(config).__name__}")
        fp_outs = list(fp_outs)
        if not fp_outs:
            raise ValueError("fp_outs is empty: give the FP outputs of at least one chunk")
        self.fp_outs, self.config = fp_outs, config
        if len(fp_outs) > 1:  # the normalisers of the mean (locations) and of L_loc (foreground weights)
            self.locations = sum(int(o.cls[0].shape[0]) * sum(c.shape[-1] * c.shape[-2] for c in o.cls)
                                 for o in fp_outs)
            fg_w = []
            for o in fp_outs:
                p = torch.cat([c.flatten(2) for c in o.cls], dim=2).sigmoid().amax(1)
                fg_w.append(((p > config.fg_threshold).to(p.dtype) if config.fg == "hard" else p).sum())
            self.w_sum = float(sum(fg_w))

    def __call__(self, q_outs: Sequence[DenseOutputs]) -> float:
        """ODOL of the quantized outputs ``q_outs`` (one per chunk, in the order of the FP outputs)."""
        q_outs = list(q_outs)
        if len(q_outs) != len(self.fp_outs):
            raise ValueError(f"q_outs has {len(q_outs)} chunks but the FP outputs have {len(self.fp_outs)}")
        if len(self.fp_outs) == 1:
            return float(odol_terms(self.fp_outs[0], q_outs[0], config=self.config)["total"])
        cls_sum = loc_sum = 0.0
        for f, q in zip(self.fp_outs, q_outs):
            t = odol_terms(f, q, reduction="sum", config=self.config)
            cls_sum += float(t["cls"])
            loc_sum += float(t["loc"])
        return cls_sum / self.locations + self.config.lam * (loc_sum / self.w_sum if self.w_sum > 0 else 0.0)
