"""DetPTQ's per-layer choice of p, guided by ODOL (METHOD.md section 5).

Source: Niu, Liu, Yuan, Yang, Wang, Liu, "Improving Post-Training Quantization on Object Detection with Task
Loss-Guided Lp Metric", arXiv 2304.09785 (2023). The paper observes that the best p of the Lp metric differs from
layer to layer, and picks it per layer with a label-free task loss: for each quantized layer ``l`` and each
``p`` in ``P = {1, 1.5, ..., 4.5}``, quantize the layer with its ``s_p*`` (:func:`detptq_mini.lp.search_model_scales`),
measure ODOL (:func:`detptq_mini.odol.odol`: the distance between the FP and the quantized detector's dense
outputs on the calibration images) and keep the ``p`` with the lowest ODOL [paper].

How :func:`select_p` does it. Choices marked [ours] are this project's reading where the paper is silent:

* **Greedy, in forward order** [ours]. The items (layers, or units with ``granularity="unit"``) are decided
  one after another. While item ``l`` is tried, the items before it are quantized with the ``p`` they were
  given; everything after it follows ``rest``: ``"fp"`` (quantizers off: the paper's "quantize this layer"
  view, the default) or ``"quantized"`` (quantized with the ``rest_p = 2`` scales). A layer left out of the
  selection (``layers=...``) follows ``rest`` throughout.
* **One p per layer** [ours], shared by its weight and input quantizers. With ``separate=True`` the two are
  chosen one after the other: first the weight p, trying each candidate ``p`` with *both* quantizers at
  ``s_p*`` (exactly the joint search, so its table is the joint table), then the activation p, with the
  weights fixed at the chosen weight p and the input quantizer trying each ``s_p*``. The second step
  contains the first step's winner as one of its candidates, so it can only lower the layer's ODOL.
* **Granularity** [paper + ours]: ``"layer"`` (simple PTQ) or ``"unit"`` (complex PTQ: all quantizers of a
  reconstruction unit at ``s_p*`` of one candidate ``p``).
* **Ties** [ours]: the first ``p`` in the order of ``ps``. Within a unit, layers are decided in module order.

Cost [ours]. A candidate does not cost a full forward: the detector restarts its forward from a unit with the live tensors cached (``model.capture`` / ``model.run``).
The cache before the current unit is computed once and advanced through each unit, with its chosen
quantization, once the unit is decided. Per candidate only the current unit and the units that depend on
its output run; the outputs of units that do not (e.g. the other head branches) are computed once per unit.
The FP target outputs are computed once. A candidate whose ``s_p*`` equal those of a candidate already tried
for the same item (it happens: a few layers reach the same scale for neighbouring p) reuses its ODOL. Everything
runs in eval mode without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from torch import Tensor, nn

from .checks import check_bool, check_choice, check_images, check_int, check_number, check_ps
from .lp import P_DEFAULT, LayerScales, search_model_scales
from .model import DenseOutputs
from .odol import ClsMode, FgMode, LocMode, odol_terms
from .quant import quant_layers

__all__ = ["Selection", "select_p", "Granularity", "Rest"]

Granularity = Literal["layer", "unit"]
Rest = Literal["fp", "quantized"]
_PROTOCOL = ("units", "unit_of", "unit_index", "capture", "run", "live_names", "outputs")


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_p`: the chosen p of every item and the ODOL of every candidate.

    An *item* is a quantized layer (``granularity="layer"``) or a unit (``"unit"``).

    Attributes:
        order: the items, in forward order (the order they were decided in).
        groups: ``{item: (quantized layer names, ...)}``; a layer is its own group with ``"layer"``.
        granularity: ``"layer"`` or ``"unit"``.
        separate: whether weight and activation p were chosen separately.
        chosen_weight: ``{item: p}`` of the weight quantizers.
        chosen_act: ``{item: p}`` of the input (activation) quantizers; equal to ``chosen_weight`` unless
            ``separate``.
        table: ``{item: {p: ODOL}}`` of every candidate; with ``separate``, of the first (weight) step.
        table_act: with ``separate``, ``{item: {p: ODOL}}`` of the activation step; else ``None``.
        config: every setting of the run (JSON-ready).
    """

    order: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    granularity: str
    separate: bool
    chosen_weight: dict[str, float]
    chosen_act: dict[str, float]
    table: dict[str, dict[float, float]]
    table_act: dict[str, dict[float, float]] | None = None
    config: dict = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, float]:
        """``{item: p}`` shared by weights and activations (an error with ``separate=True``)."""
        if self.separate:
            raise ValueError("separate=True: the selection has chosen_weight and chosen_act, not one chosen p")
        return self.chosen_weight

    def layer_p(self, kind: Literal["weight", "act"] = "weight") -> dict[str, float]:
        """The chosen p per quantized layer (units expanded to their layers), in forward order."""
        check_choice("kind", kind, ("weight", "act"))
        chosen = self.chosen_weight if kind == "weight" else self.chosen_act
        return {layer: chosen[item] for item in self.order for layer in self.groups[item]}

    def to_dict(self) -> dict:
        """A JSON-ready dict (p keys as strings such as ``"2.5"``)."""

        def tab(t):
            return {item: {str(float(p)): float(v) for p, v in row.items()} for item, row in t.items()}

        out = {"granularity": self.granularity, "separate": self.separate, "order": list(self.order),
               "groups": {k: list(v) for k, v in self.groups.items()}}
        if self.separate:
            out.update(chosen_weight=dict(self.chosen_weight), chosen_act=dict(self.chosen_act),
                       table=tab(self.table), table_act=tab(self.table_act))
        else:
            out.update(chosen=dict(self.chosen_weight), table=tab(self.table))
        out["config"] = dict(self.config)
        return out


# ------------------------------------------------------------------ checks
def _check_scales(scales, groups: dict[str, tuple[str, ...]], ps, rest_names, rest_p) -> None:
    if not isinstance(scales, dict):
        raise ValueError(f"scales must be the dict of search_model_scales, got {type(scales).__name__}")
    for item, names in groups.items():
        for n in names:
            sc = scales.get(n)
            if not isinstance(sc, LayerScales):
                raise ValueError(f"scales has no LayerScales for layer {n!r}; run search_model_scales on every layer")
            missing = [p for p in ps if p not in sc.weight or p not in sc.act]
            if missing:
                raise ValueError(f"scales of layer {n!r} lack p={missing}; searched: {sorted(sc.weight)}")
    for n in rest_names:
        sc = scales.get(n)
        if not isinstance(sc, LayerScales) or rest_p not in sc.weight or rest_p not in sc.act:
            raise ValueError(f"scales lack p={rest_p} (rest_p) for layer {n!r}; the layers outside the selection "
                             "(and all later layers with rest='quantized') use it")


# ------------------------------------------------------------------ helpers
def _set(layer, scales: LayerScales, w_p: float | None, a_p: float | None) -> None:
    """Weight quantizer at ``s_{w_p}*`` (off if ``w_p`` is None), input quantizer at ``s_{a_p}*`` (likewise)."""
    if w_p is not None:
        layer.weight_quantizer.set_qparams(*scales.weight[w_p])
    if a_p is not None:
        layer.input_quantizer.set_qparams(*scales.act[a_p])
    layer.set_quant_state(w_p is not None, a_p is not None)


def _same_scales(scales, names, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether the candidates ``a = (w_p, a_p)`` and ``b`` give every layer of ``names`` the same qparams."""
    for n in names:
        for qp_a, qp_b in ((scales[n].weight[a[0]], scales[n].weight[b[0]]), (scales[n].act[a[1]], scales[n].act[b[1]])):
            if not (torch.equal(qp_a[0], qp_b[0]) and torch.equal(qp_a[1], qp_b[1])):
                return False
    return True


def _outputs(model, env: dict[str, Tensor]) -> DenseOutputs:
    cls_names, box_names = model.outputs
    return DenseOutputs(tuple(env[n] for n in cls_names), tuple(env[n] for n in box_names))


class _Odol:
    """ODOL over the calibration chunks: exact ``odol`` for one chunk, sums combined over several."""

    def __init__(self, fp_outs: list[DenseOutputs], cls: str, loc: str, fg: str, lam: float):
        self.fp_outs, self.kw, self.lam = fp_outs, dict(cls=cls, loc=loc, fg=fg, lam=lam), lam
        if len(fp_outs) > 1:  # the normalizers of the mean (locations) and of L_loc (foreground weights)
            self.locations = sum(int(o.cls[0].shape[0]) * sum(c.shape[-1] * c.shape[-2] for c in o.cls)
                                 for o in fp_outs)
            fg_w = []
            for o in fp_outs:
                p = torch.cat([c.flatten(2) for c in o.cls], dim=2).sigmoid().amax(1)
                fg_w.append(((p > 0.25).to(p.dtype) if fg == "hard" else p).sum())
            self.w_sum = float(sum(fg_w))

    def __call__(self, q_outs: list[DenseOutputs]) -> float:
        if len(self.fp_outs) == 1:
            return float(odol_terms(self.fp_outs[0], q_outs[0], **self.kw)["total"])
        cls_sum = loc_sum = 0.0
        for f, q in zip(self.fp_outs, q_outs):
            t = odol_terms(f, q, reduction="sum", **self.kw)
            cls_sum += float(t["cls"])
            loc_sum += float(t["loc"])
        return cls_sum / self.locations + self.lam * (loc_sum / self.w_sum if self.w_sum > 0 else 0.0)


# -------------------------------------------------------------------- main
@torch.no_grad()
def select_p(qmodel: nn.Module, images, scales: dict[str, LayerScales] | None = None,
             ps: Iterable[float] = P_DEFAULT, granularity: Granularity = "layer", separate: bool = False,
             rest: Rest = "fp", cls: ClsMode = "kl", loc: LocMode = "l1", fg: FgMode = "soft", lam: float = 1.0,
             batch_size: int = 64, progress: bool = False, layers: Iterable[str] | None = None,
             rest_p: float = 2.0) -> Selection:
    """Choose p per layer (or per unit) by ODOL, greedily in forward order (DetPTQ; see the module docstring).

    Args:
        qmodel: a quantized restartable detector (:func:`detptq_mini.quant.quantize_model` of a
            :class:`~detptq_mini.model.Detector`). Modified in place: on return every quantizer is enabled,
            the selected layers at ``s_p*`` of their chosen p, the others at ``s_{rest_p}*``.
        images: calibration images ``(N, 3, H, W)`` (or a data set with ``.images()``); labels are never used.
        scales: ``search_model_scales(qmodel, ...)`` output covering ``ps`` (and ``rest_p``); searched on
            ``images`` (with ``batch_size``) if None.
        ps: the candidate p (default ``P = {1, 1.5, ..., 4.5}``).
        granularity: ``"layer"``: one p per quantized conv; ``"unit"``: one p per unit, shared by its convs.
        separate: choose the weight p and the activation p separately (weight first, then activation).
        rest: the layers after the one being tried: ``"fp"`` (off) or ``"quantized"`` (at ``s_{rest_p}*``).
        cls, loc, fg, lam: the ODOL variant (:func:`detptq_mini.odol.odol`); default KL + L1, soft foreground.
        batch_size: images per forward; with more images than this, ODOL's sums are combined over chunks.
        progress: show a tqdm bar over the items.
        layers: restrict the selection to these quantized layers (default all); the others follow ``rest``
            during the selection and end at ``s_{rest_p}*``.
        rest_p: the p of the ``rest="quantized"`` layers and of the layers outside the selection.

    Returns:
        a :class:`Selection` with the chosen p and the ODOL of every candidate.

    Raises:
        ValueError: an unknown mode, empty or non-positive ``ps``, bad images, unknown ``layers``, ``scales``
            that lack a needed p, or a model that is not a quantized restartable detector. (Arguments are
            checked before ``qmodel`` is touched.)
    """
    # ---- arguments
    check_choice("granularity", granularity, Granularity)
    check_choice("rest", rest, Rest)
    check_choice("cls", cls, ClsMode)
    check_choice("loc", loc, LocMode)
    check_choice("fg", fg, FgMode)
    check_bool("separate", separate)
    check_bool("progress", progress)
    check_number("lam", lam, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    ps = check_ps(ps)
    rest_p = check_number("rest_p", rest_p, 0, low_open=True)
    missing = [a for a in _PROTOCOL if not hasattr(qmodel, a)]
    if missing:
        raise ValueError(f"qmodel must be a restartable detector (with {', '.join(_PROTOCOL)}); it lacks "
                         f"{', '.join(missing)}")
    all_layers = quant_layers(qmodel)
    if not all_layers:
        raise ValueError("qmodel has no QuantConv2d layers: quantize it with quantize_model first")
    if layers is None:
        selected = list(all_layers)
    else:
        selected = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in selected if n not in all_layers]
        if unknown or not selected:
            raise ValueError(f"layers={unknown or selected!r}: give a non-empty list of quantized layers; "
                             f"allowed: {', '.join(all_layers)}")
        selected = [n for n in all_layers if n in set(selected)]  # forward order, no duplicates
    images = check_images(images, "images")

    # ---- items: layers or units, in forward order; each with its unit index
    unit_of = {n: qmodel.unit_index(qmodel.unit_of(n)) for n in all_layers}
    if granularity == "layer":
        groups = {n: (n,) for n in selected}
        item_unit = {n: unit_of[n] for n in selected}
    else:
        groups, item_unit = {}, {}
        for n in selected:
            u = qmodel.units[unit_of[n]].name
            groups.setdefault(u, ())
            groups[u] += (n,)
            item_unit[u] = unit_of[n]
    order = tuple(sorted(groups, key=lambda i: item_unit[i]))  # stable: layer order within a unit is kept
    outside = [n for n in all_layers if n not in set(selected)]

    device = next(qmodel.parameters()).device
    images = images.to(device)
    if scales is None:
        scales = search_model_scales(qmodel, images, tuple(dict.fromkeys(ps + (rest_p,))), batch_size=batch_size)
    rest_names = outside + (selected if rest == "quantized" else [])
    _check_scales(scales, groups, ps, rest_names, rest_p)

    config = {"ps": list(ps), "granularity": granularity, "separate": separate, "rest": rest, "rest_p": rest_p,
              "cls": cls, "loc": loc, "fg": fg, "lam": float(lam), "batch_size": batch_size,
              "layers": None if layers is None else list(selected), "images": int(images.shape[0])}
    modes = {m: m.training for m in qmodel.modules()}
    qmodel.eval()
    try:
        # ---- FP targets, once
        chunks = [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]
        for m in all_layers.values():
            m.set_quant_state(False, False)
        fp_outs = [qmodel(x) for x in chunks]
        measure = _Odol(fp_outs, cls, loc, fg, lam)

        # ---- the starting state: everything follows `rest`
        def rest_state(name):
            if rest == "quantized":
                _set(all_layers[name], scales[name], rest_p, rest_p)
            else:
                all_layers[name].set_quant_state(False, False)

        for n in all_layers:
            rest_state(n)

        units = qmodel.units
        first = item_unit[order[0]]
        envs = [qmodel.capture(x, first) for x in chunks]  # live tensors before unit `first`
        at = first

        def advance(to: int) -> None:
            nonlocal envs, at
            if to > at:
                live = qmodel.live_names(to)
                envs = [{n: e[n] for n in live} for e in (qmodel.run(env, at, to) for env in envs)]
                at = to

        def dependents(k: int) -> tuple[list[int], list[int]]:
            """Units after ``k`` that read (transitively) unit k's output, and those that do not."""
            dep, on, off = {units[k].output}, [], []
            for j in range(k + 1, len(units)):
                if any(n in dep for n in units[j].inputs):
                    dep.add(units[j].output)
                    on.append(j)
                else:
                    off.append(j)
            return on, off

        def evaluate(k: int, fixed: list[dict[str, Tensor]], on: list[int]) -> float:
            q_outs = []
            for env in fixed:
                env = qmodel.run(env, k, k + 1)
                for j in on:
                    env = qmodel.run(env, j, j + 1)
                q_outs.append(_outputs(qmodel, env))
            return measure(q_outs)

        chosen_w, chosen_a, table, table_act = {}, {}, {}, ({} if separate else None)
        it = order
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(order, desc="DetPTQ p selection", unit=granularity)
        cur_unit, fixed, on = None, None, None
        for item in it:
            k = item_unit[item]
            if k != cur_unit:  # a new unit: advance the cache, run the units independent of it once
                advance(k)
                on, off = dependents(k)
                fixed = []
                for env in envs:
                    for j in off:
                        env = qmodel.run(env, j, j + 1)
                    fixed.append(env)
                cur_unit = k
            names = groups[item]
            tried: list[tuple[float, float, float]] = []  # (w_p, a_p, ODOL) of this item's candidates so far

            def trial(w_p, a_p):
                for w2, a2, value in tried:  # the same scales as an earlier candidate: the same ODOL, for free
                    if _same_scales(scales, names, (w_p, a_p), (w2, a2)):
                        return value
                for n in names:
                    _set(all_layers[n], scales[n], w_p, a_p)
                value = evaluate(k, fixed, on)
                tried.append((w_p, a_p, value))
                return value

            row = {p: trial(p, p) for p in ps}
            best = min(ps, key=lambda p: (row[p], ps.index(p)))  # ties: the first p in ps
            table[item] = row
            chosen_w[item] = chosen_a[item] = best
            if separate:
                row_a = {p: trial(best, p) for p in ps}  # (best, best) is found among the tried candidates
                chosen_a[item] = min(ps, key=lambda p: (row_a[p], ps.index(p)))
                table_act[item] = row_a
            for n in names:
                _set(all_layers[n], scales[n], chosen_w[item], chosen_a[item])

        # ---- the final state: every quantizer on
        for n in outside:
            _set(all_layers[n], scales[n], rest_p, rest_p)
    finally:
        for m, training in modes.items():
            m.train(training)
    return Selection(order=order, groups=groups, granularity=granularity, separate=separate,
                     chosen_weight=chosen_w, chosen_act=chosen_a, table=table, table_act=table_act, config=config)
