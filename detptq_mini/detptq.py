"""DetPTQ's per-layer choice of p, guided by ODOL (method page, section 5).

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

Cost [ours]. A candidate does not cost a full forward: the detector restarts its forward from a unit with the
live tensors cached (``model.capture`` / ``model.run``). The cache before the current unit is computed once and
advanced through each unit, with its chosen quantization, once the unit is decided. Per candidate only the
current unit and the units that depend on its output (``model.dependents``) run; the outputs of units that do
not (e.g. the other head branches) are computed once per unit.
The FP target outputs are computed once. A candidate whose ``s_p*`` equal those of a candidate already tried
for the same item (it happens: a few layers reach the same scale for neighbouring p) reuses its ODOL. Everything
runs in eval mode without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_bool, check_choice, check_images, check_int, check_number, check_ps
from .lp import P_DEFAULT, LayerScales, search_model_scales
from .model import UnitDetector, check_unit_detector
from .odol import ChunkedOdol, OdolConfig
from .quant import QuantConv2d, eval_mode, quantization_off, select_layers

__all__ = ["Selection", "select_p", "Granularity", "Rest"]

Granularity = Literal["layer", "unit"]
Rest = Literal["fp", "quantized"]


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
        w, act = scales[n].weight, scales[n].act
        for qp_a, qp_b in ((w[a[0]], w[b[0]]), (act[a[1]], act[b[1]])):
            if not (torch.equal(qp_a[0], qp_b[0]) and torch.equal(qp_a[1], qp_b[1])):
                return False
    return True


def _selected(all_layers: dict[str, QuantConv2d], qmodel: nn.Module, layers) -> list[str]:
    """The layers to decide, in forward order (all if ``layers`` is None)."""
    if layers is None:
        return list(all_layers)
    chosen = select_layers(qmodel, layers)
    if not chosen:
        raise ValueError(f"layers={list(layers)!r} is empty: give at least one quantized layer; "
                         f"allowed: {', '.join(all_layers)}")
    return [n for n in all_layers if n in chosen]  # forward order, no duplicates


def _items(qmodel: UnitDetector, selected: list[str], granularity: str):
    """The items in forward order, ``{item: its layers}`` and ``{item: its unit index}``."""
    unit_of = {n: qmodel.unit_index(qmodel.unit_of(n)) for n in selected}
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
    return order, groups, item_unit


def _lowest(row: dict[float, float], ps: tuple[float, ...]) -> float:
    """The p of the lowest ODOL in ``row``; ties: the first p in ``ps``."""
    return min(ps, key=lambda p: (row[p], ps.index(p)))


class _Greedy:
    """The state of the greedy search and the cheap ODOL of a candidate (see "Cost" in the module docstring).

    ``envs`` hold, per calibration chunk, the live tensors before unit ``at``, computed with every decided item
    at its chosen p. When an item of a new unit ``k`` starts, they are advanced to ``k``; the later units that do
    not read unit ``k``'s output (``model.dependents``) run once on them (``fixed``), and a candidate runs only
    unit ``k`` and the units that do (``on``). A candidate whose scales equal those of a candidate already tried
    for the same item gets its ODOL without a forward.
    """

    def __init__(self, qmodel: UnitDetector, layers: dict[str, QuantConv2d], scales: dict[str, LayerScales],
                 chunks: list[Tensor], first: int, measure: ChunkedOdol):
        self.model, self.layers, self.scales, self.measure = qmodel, layers, scales, measure
        self.envs = [qmodel.capture(x, first) for x in chunks]  # live tensors before unit `first`
        self.at = first
        self.unit: int | None = None
        self.fixed: list[dict[str, Tensor]] = []
        self.on: tuple[int, ...] = ()
        self.names: tuple[str, ...] = ()
        self.tried: list[tuple[float, float, float]] = []  # (w_p, a_p, ODOL) of the item's candidates so far

    def start(self, unit: int, names: Sequence[str]) -> None:
        """Begin an item: the layers ``names`` of unit ``unit`` (at or after the current unit)."""
        if unit != self.unit:  # a new unit: advance the cache, run the units independent of it once
            self._advance(unit)
            self.on, off = self.model.dependents(unit)
            self.fixed = [self._run(env, off) for env in self.envs]
            self.unit = unit
        self.names, self.tried = tuple(names), []

    def odol(self, w_p: float, a_p: float) -> float:
        """ODOL with the item's weight quantizers at ``s_{w_p}*`` and input quantizers at ``s_{a_p}*``."""
        for w2, a2, value in self.tried:  # the same scales as an earlier candidate: the same ODOL, for free
            if _same_scales(self.scales, self.names, (w_p, a_p), (w2, a2)):
                return value
        self.set(w_p, a_p)
        k = self.unit
        value = self.measure([self.model.collect(self._run(self.model.run(env, k, k + 1), self.on))
                              for env in self.fixed])
        self.tried.append((w_p, a_p, value))
        return value

    def set(self, w_p: float, a_p: float) -> None:
        """Put the item's layers at ``(w_p, a_p)``."""
        for n in self.names:
            _set(self.layers[n], self.scales[n], w_p, a_p)

    def _run(self, env: dict[str, Tensor], units: Sequence[int]) -> dict[str, Tensor]:
        for j in units:
            env = self.model.run(env, j, j + 1)
        return env

    def _advance(self, to: int) -> None:
        if to > self.at:
            live = self.model.live_names(to)
            self.envs = [{n: e[n] for n in live} for e in (self.model.run(env, self.at, to) for env in self.envs)]
            self.at = to


# -------------------------------------------------------------------- main
@torch.no_grad()
def select_p(qmodel: nn.Module, images, scales: dict[str, LayerScales] | None = None,
             ps: Iterable[float] = P_DEFAULT, granularity: Granularity = "layer", separate: bool = False,
             rest: Rest = "fp", odol: OdolConfig = OdolConfig(), batch_size: int = 64, progress: bool = False,
             layers: Iterable[str] | None = None, rest_p: float = 2.0) -> Selection:
    """Choose p per layer (or per unit) by ODOL, greedily in forward order (DetPTQ; see the module docstring).

    Args:
        qmodel: a quantized :class:`~detptq_mini.model.UnitDetector` (:func:`detptq_mini.quant.quantize_model`
            of a :class:`~detptq_mini.model.Detector`, say). Modified in place: on return every quantizer is enabled,
            the selected layers at ``s_p*`` of their chosen p, the others at ``s_{rest_p}*``.
        images: calibration images ``(N, 3, H, W)`` (or a data set with ``.images()``); labels are never used.
        scales: ``search_model_scales(qmodel, ...)`` output covering ``ps`` (and ``rest_p``); searched on
            ``images`` (with ``batch_size``) if None.
        ps: the candidate p (default ``P = {1, 1.5, ..., 4.5}``).
        granularity: ``"layer"``: one p per quantized conv; ``"unit"``: one p per unit, shared by its convs.
        separate: choose the weight p and the activation p separately (weight first, then activation).
        rest: the layers after the one being tried: ``"fp"`` (off) or ``"quantized"`` (at ``s_{rest_p}*``).
        odol: the ODOL variant (:class:`~detptq_mini.odol.OdolConfig`); default KL + L1, soft foreground.
        batch_size: images per forward; with more images than this, ODOL's sums are combined over chunks.
        progress: show a tqdm bar over the items.
        layers: restrict the selection to these quantized layers (default all); the others follow ``rest``
            during the selection and end at ``s_{rest_p}*``.
        rest_p: the p of the ``rest="quantized"`` layers and of the layers outside the selection.

    Returns:
        a :class:`Selection` with the chosen p and the ODOL of every candidate.

    Raises:
        ValueError: an unknown mode, empty or non-positive ``ps``, bad images, unknown ``layers``, ``scales``
            that lack a needed p, or a model that is not a quantized UnitDetector. (Arguments are
            checked before ``qmodel`` is touched.)
    """
    # ---- arguments
    check_choice("granularity", granularity, Granularity)
    check_choice("rest", rest, Rest)
    if not isinstance(odol, OdolConfig):
        raise ValueError(f"odol must be an OdolConfig (e.g. OdolConfig(cls='kl', loc='l1')), got {type(odol).__name__}")
    check_bool("separate", separate)
    check_bool("progress", progress)
    batch_size = check_int("batch_size", batch_size, 1)
    ps = check_ps(ps)
    rest_p = check_number("rest_p", rest_p, 0, low_open=True)
    check_unit_detector(qmodel, "qmodel")
    all_layers = select_layers(qmodel)  # every quantized layer, in forward order
    selected = _selected(all_layers, qmodel, layers)
    images = check_images(images, "images")
    order, groups, item_unit = _items(qmodel, selected, granularity)
    outside = [n for n in all_layers if n not in set(selected)]

    device = next(qmodel.parameters()).device
    images = images.to(device)
    if scales is None:
        scales = search_model_scales(qmodel, images, tuple(dict.fromkeys(ps + (rest_p,))), batch_size=batch_size)
    _check_scales(scales, groups, ps, outside + (selected if rest == "quantized" else []), rest_p)
    config = {"ps": list(ps), "granularity": granularity, "separate": separate, "rest": rest, "rest_p": rest_p,
              "cls": odol.cls, "loc": odol.loc, "fg": odol.fg, "lam": float(odol.lam), "batch_size": batch_size,
              "layers": None if layers is None else list(selected), "images": int(images.shape[0])}

    chosen_w, chosen_a, table, table_act = {}, {}, {}, ({} if separate else None)
    with eval_mode(qmodel):
        chunks = [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]
        with quantization_off(qmodel):
            fp_outs = [qmodel(x) for x in chunks]  # the FP targets, once
        for name, layer in all_layers.items():  # the starting state: every layer follows `rest`
            if rest == "quantized":
                _set(layer, scales[name], rest_p, rest_p)
            else:
                layer.set_quant_state(False, False)
        search = _Greedy(qmodel, all_layers, scales, chunks, item_unit[order[0]], ChunkedOdol(fp_outs, odol))

        # ---- DetPTQ: item by item in forward order, the candidate p with the lowest ODOL
        for item in tqdm(order, desc="DetPTQ p selection", unit=granularity, disable=not progress):
            search.start(item_unit[item], groups[item])
            table[item] = {p: search.odol(p, p) for p in ps}
            chosen_w[item] = chosen_a[item] = _lowest(table[item], ps)
            if separate:  # then the activation p, the weights at theirs ((best, best) is among the tried)
                table_act[item] = {p: search.odol(chosen_w[item], p) for p in ps}
                chosen_a[item] = _lowest(table_act[item], ps)
            search.set(chosen_w[item], chosen_a[item])

        for n in outside:  # the final state: every quantizer on
            _set(all_layers[n], scales[n], rest_p, rest_p)
    return Selection(order=order, groups=groups, granularity=granularity, separate=separate,
                     chosen_weight=chosen_w, chosen_act=chosen_a, table=table, table_act=table_act, config=config)
