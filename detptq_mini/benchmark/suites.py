"""The benchmark's cells and named suites: what to run, not how.

A :class:`Cell` is one ``detptq-mini quantize ... --json`` run (method x bits x calibration seed, with its options);
its :attr:`Cell.key` names it in a result file. :data:`SUITES` holds the named suites: ``full`` (the main comparison:
every method x W8A8/W4A8/W4A4/W3A3 x 3 seeds), ``ablations`` (ODOL combination, 8-bit conventions, QDrop
probability), ``loss-norm`` (the W4A4 reconstruction settings with and without each unit's loss divided by its value
before reconstruction), ``simple`` (chapter 6's table), ``recon`` (the reconstruction experiments), ``paper`` (the paper's rows for a
second detector, e.g. ``--model retinanet-r18``), ``paper-recon`` (its reconstruction cells under our protocol) and ``quick`` (every method on a tiny slice, about a minute).
Decisions of ``full``, stated in the book too:

* "best fixed p" is no cell of its own: the Lp cells cover every p of ``P_DEFAULT`` at every bits, and the report
  (:func:`~detptq_mini.benchmark.report.summarize`) picks per bits the p with the best mean over seeds, an oracle
  choice made on the val set; Lp with p = 2.4 (not in ``P_DEFAULT``) is a cell of its own.
* every method calibrates on the same 256 images (the setting of the long reconstruction runs,
  ``benchmarks/results/reconstruction_runs.json``); mAP on the 500 val images.
* BRECQ, QDrop and DetPTQ+QDrop run at W4A8, W4A4 and W3A3 (W8A8 needs no reconstruction) with one budget per bits,
  :data:`RECON_ITERS`, at the learning rates :data:`RECON_LR`.
* cheap cells come first, then the reconstruction cells of seed 0, then of seeds 1 and 2: a partial run is a table.

:func:`select_cells` picks a suite's cells by key substring; :func:`is_done` tells a successful cell's record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..checkpoint import MODELS
from ..checks import check_choice, check_int, check_number, shown
from ..lp import P_DEFAULT

__all__ = ["Cell", "FULL_BITS", "SEEDS", "FULL_CALIB", "FULL_VAL", "RECON_ITERS", "RECON_LR", "RECON_METHODS",
           "LP_EXTRA_P", "ODOL_COMBOS", "HEAD_FP", "TWO_COIN", "BRECQ_LR_ACT", "QDROP_PROBS",
           "LONG_ITERS", "PAPER_CALIB", "QUANT_PROB_ONE", "REST_QUANTIZED", "EIGHT_BIT_OFF", "LOSS_NORM_BEFORE",
           "SUITES", "bits_pair", "suite_cells", "select_cells", "is_done", "on_model"]


@dataclass(frozen=True)
class Cell:
    """One benchmark cell: ``detptq-mini quantize`` with these options.

    Attributes:
        method: a ``quantize --method`` (not checked here: an unknown method makes a failed cell).
        w_bits, a_bits: bit widths (not range-checked here: the child reports bad values, the cell fails).
        seed: the calibration seed (the ``seed`` of the calib split).
        p: the fixed p (``--p``), or None.
        calib: number of calibration images.
        val: number of val images for the mAP.
        iters: ``--iters`` for the reconstruction methods, or None (the option is then not passed).
        lr_v, lr_act: ``--lr-v`` and ``--lr-act`` (the reconstruction's Adam learning rates), or None (the library's
            defaults).
        extra: further ``quantize`` arguments, e.g. ``("--no-8bit-stem",)``.
        model: the detector (``quantize --model``, one of :data:`~detptq_mini.checkpoint.MODELS`): ``"yolo"`` (the
            default, and then not in the key, so that every key made before the field existed is unchanged) or
            ``"retinanet-r18"``, which starts the key.
    """

    method: str
    w_bits: int
    a_bits: int
    seed: int = 0
    p: float | None = None
    calib: int = 64
    val: int = 500
    iters: int | None = None
    lr_v: float | None = None
    lr_act: float | None = None
    extra: tuple[str, ...] = ()
    model: str = "yolo"

    def __post_init__(self):
        check_choice("model", self.model, MODELS)
        if not isinstance(self.method, str) or not self.method or any(c.isspace() for c in self.method):
            raise ValueError(f"method={self.method!r} must be a non-empty method name without spaces")
        for name in ("w_bits", "a_bits", "seed", "calib", "val", "iters"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), allow_none=name == "iters"))
        for name in ("p", "lr_v", "lr_act"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), allow_none=True))
        extra = tuple(self.extra) if isinstance(self.extra, (list, tuple)) else self.extra
        if not isinstance(extra, tuple) or not all(isinstance(a, str) for a in extra):
            raise ValueError(f"extra={self.extra!r} must be a tuple of strings (command-line arguments)")
        object.__setattr__(self, "extra", extra)

    @property
    def bits(self) -> str:
        """``"W4A4"``."""
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def key(self) -> str:
        """A stable, readable id, e.g. ``"lp-p2.5-W4A4-s0-c64-v500"`` (``-i<iters>``, ``-lrv<lr_v>``,
        ``-lra<lr_act>`` and ``+<arg>`` when set; ``"retinanet-r18-lp-p2.5-..."`` on another model than yolo)."""
        parts = [self.method] if self.model == "yolo" else [self.model, self.method]
        if self.p is not None:
            parts.append(f"p{self.p:g}")
        parts += [self.bits, f"s{self.seed}", f"c{self.calib}", f"v{self.val}"]
        if self.iters is not None:
            parts.append(f"i{self.iters}")
        if self.lr_v is not None:
            parts.append(f"lrv{self.lr_v:g}")
        if self.lr_act is not None:
            parts.append(f"lra{self.lr_act:g}")
        key = "-".join(parts)
        for a in self.extra:
            key += "+" + a.lstrip("-")
        return key


#: DetPTQ's p chosen with the layers after the one under test quantized at p = 2 (``--rest quantized``) instead of FP.
REST_QUANTIZED: tuple[str, ...] = ("--rest", "quantized")


def _simple_suite() -> list[Cell]:
    """Bits, then method (min-max, Lp with p = 1..4.5, DetPTQ), then seed: a table reads top to bottom; then DetPTQ
    with :data:`REST_QUANTIZED` at both bits and seeds (chapter 6's "FP or quantized rest" question)."""
    variants = [("minmax", None), *(("lp", p) for p in P_DEFAULT), ("detptq", None)]
    bits = ((4, 4), (4, 8))
    cells = [Cell(method, w, a, seed, p=p) for w, a in bits for method, p in variants for seed in (0, 1, 2)]
    return cells + [Cell("detptq", w, a, seed, extra=REST_QUANTIZED) for w, a in bits for seed in (0, 1, 2)]


#: Bit widths of the ``full`` comparison, in table order.
FULL_BITS: tuple[tuple[int, int], ...] = ((8, 8), (4, 8), (4, 4), (3, 3))
#: Calibration seeds of ``full`` and ``ablations``.
SEEDS: tuple[int, ...] = (0, 1, 2)
#: Calibration images of every cell of ``full`` and ``ablations`` (the setting of the long reconstruction runs,
#: ``benchmarks/results/reconstruction_runs.json``, used for every method so that the rows compare on the same data),
#: and val images of the mAP.
FULL_CALIB = 256
FULL_VAL = 500
#: The reconstruction budget (``--iters``, steps per unit) of each bits column, one budget for BRECQ, QDrop and
#: DetPTQ+QDrop alike. The bits named here are the ones that get reconstruction cells (W8A8 needs none). 1,000 steps
#: at the learning rates of :data:`RECON_LR` is the best W4A4 setting of the long reconstruction runs
#: (``benchmarks/results/reconstruction_runs.json``, runs R1 and R5: 63.4 % of FP for DetPTQ+QDrop, beating 2,000 steps
#: at the library's default rates, 57.6 %) and costs half as much.
RECON_ITERS: dict[str, int] = {"W4A8": 1000, "W4A4": 1000, "W3A3": 1000}
#: The Adam learning rates (``--lr-v``, ``--lr-act``) of every reconstruction cell of ``full`` and ``ablations``:
#: 10x the library's defaults (1e-3, 4e-5: the reference implementations' rates, sized for 20,000 steps).
RECON_LR: tuple[float, float] = (0.01, 0.001)
#: The reconstruction methods, in table order.
RECON_METHODS: tuple[str, ...] = ("brecq", "joint", "qdrop", "detptq-qdrop")
#: The fixed p of range search common in the literature; a cell of its own (it is not in ``P_DEFAULT``).
LP_EXTRA_P = 2.4
#: The ODOL combinations (classification, localization) of the selection ablation; the first is the default.
ODOL_COMBOS: tuple[tuple[str, str], ...] = (("kl", "l1"), ("kl", "iou"), ("l2", "l1"), ("l2", "iou"))
#: DetPTQ+QDrop with every activation element quantized during reconstruction (BRECQ's setting).
QUANT_PROB_ONE: tuple[str, ...] = ("--quant-prob", "1")
#: The 8-bit conventions turned off in the ablation (stem alone, prediction convs alone, both).
EIGHT_BIT_OFF: tuple[tuple[str, ...], ...] = (("--no-8bit-stem",), ("--no-8bit-pred",),
                                              ("--no-8bit-stem", "--no-8bit-pred"))
#: Each unit's reconstruction loss divided by its value before reconstruction (the ``loss-norm`` experiment).
LOSS_NORM_BEFORE: tuple[str, ...] = ("--loss-norm", "before")
#: QDrop's earlier scheme (two coins at a unit's input, pooled masks), kept as an ablation; the committed cells made
#: before the reference's single coin are these.
TWO_COIN: tuple[str, ...] = ("--qdrop-input", "two-coin")
#: BRECQ's second-stage rate (``--lr-act`` of a ``brecq`` cell), 10x its reference's 4e-4, as :data:`RECON_LR` is 10x
#: the others'.
BRECQ_LR_ACT = 0.004


def bits_pair(bits: str) -> tuple[int, int]:
    """``"W4A8"`` -> ``(4, 8)``: the weight and activation bits of a bits column (as :attr:`Cell.bits` writes it)."""
    w, a = bits[1:].split("A")
    return int(w), int(a)


def _recon_opts(bits: str, method: str = "qdrop") -> dict:
    """The reconstruction budget of a bits column as :class:`Cell` fields (``iters``, ``lr_v``, ``lr_act``); a
    ``brecq`` cell's ``lr_act`` is its second stage's, :data:`BRECQ_LR_ACT`."""
    return {"iters": RECON_ITERS[bits], "lr_v": RECON_LR[0], "lr_act": BRECQ_LR_ACT if method == "brecq" else RECON_LR[1]}


def _recon_variants(bits: str, seed: int, extra: tuple[str, ...] = ()) -> list[Cell]:
    """The reconstruction rows of a bits column, in table order: BRECQ (two stages), joint, QDrop, QDrop with two
    coins, DetPTQ+QDrop, DetPTQ+QDrop with two coins (the two-coin cells and joint are the committed runs of the
    earlier code, under their corrected names), each at its budget, with ``extra`` appended."""
    w, a = bits_pair(bits)
    opts = {"calib": FULL_CALIB, "val": FULL_VAL}
    rows = [("brecq", ()), ("joint", ()), ("qdrop", ()), ("qdrop", TWO_COIN), ("detptq-qdrop", ()),
            ("detptq-qdrop", TWO_COIN)]
    return [Cell(m, w, a, seed, extra=e + extra, **_recon_opts(bits, m), **opts) for m, e in rows]


def _full_suite() -> list[Cell]:
    """The full comparison, cheap cells first so that a partial run is already a table.

    Order: every simple cell (min-max, Lp with each p in ``P_DEFAULT`` and with p = 2.4, DetPTQ simple) for every
    bits of :data:`FULL_BITS` and seed; then the reconstruction cells (BRECQ, joint, QDrop, QDrop with two coins,
    DetPTQ+QDrop, DetPTQ+QDrop with two coins at the bits of :data:`RECON_ITERS`, each at its budget) of seed 0,
    then of seed 1, then of seed 2.
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL}
    simple = [("minmax", None), *(("lp", p) for p in P_DEFAULT), ("lp", LP_EXTRA_P), ("detptq", None)]
    cells = [Cell(m, w, a, s, p=p, **opts) for w, a in FULL_BITS for m, p in simple for s in SEEDS]
    cells += [c for s in SEEDS for bits in RECON_ITERS for c in _recon_variants(bits, s)]
    return cells


def _ablation_suite() -> list[Cell]:
    """The ablations, cheap cells first (W4A4, the informative bits, before W4A8), then the reconstruction cells seed
    by seed.

    * ODOL combination of DetPTQ's selection at W4A4 and W4A8: KL+L1 (the default: the plain ``detptq`` cell, the
      same as in ``full``), KL+IoU, L2+L1, L2+IoU (``--odol-cls``, ``--odol-loc``).
    * 8-bit conventions at W4A4: DetPTQ simple with the stem, the prediction convs, or both at the target bits
      (on: the plain cell above); DetPTQ+QDrop with both off, against the plain cell (on).
    * QDrop probability at W4A4: QDrop (0.5) against joint (1.0), same scales, budget and loss; and DetPTQ+QDrop
      at 0.5 (the plain cell) against 1.0 (``--quant-prob 1``: DetPTQ's p inside the joint scheme).
    * DetPTQ simple at W3A3 with its p chosen with the later layers quantized (:data:`REST_QUANTIZED`), against the
      plain cell of ``full`` (later layers FP): does the greedy FP-tail selection explain DetPTQ's W3A3 deficit?

    The QDrop cells are the earlier two-coin scheme's (``--qdrop-input two-coin``), as committed; the reference's
    single coin is the ``recon`` suite's.

    Every setting but the ablated one is that of ``full`` (calibration images, val images, budget), so the cells
    equal to a ``full`` cell have its key and can be copied from its result file (``--reuse``).
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL}
    odol = [() if (c, l) == ODOL_COMBOS[0] else ("--odol-cls", c, "--odol-loc", l) for c, l in ODOL_COMBOS]
    cells = [Cell("detptq", 4, 4, s, extra=e, **opts) for e in odol for s in SEEDS]
    cells += [Cell("detptq", 4, 4, s, extra=e, **opts) for e in EIGHT_BIT_OFF for s in SEEDS]
    cells += [Cell("detptq", 4, 8, s, extra=e, **opts) for e in odol for s in SEEDS]
    cells += [Cell("detptq", 3, 3, s, extra=REST_QUANTIZED, **opts) for s in SEEDS]
    opts.update(_recon_opts("W4A4"))
    for s in SEEDS:
        cells += [Cell("joint", 4, 4, s, **opts), Cell("qdrop", 4, 4, s, extra=TWO_COIN, **opts),
                  Cell("detptq-qdrop", 4, 4, s, extra=TWO_COIN, **opts),
                  Cell("detptq-qdrop", 4, 4, s, extra=QUANT_PROB_ONE, **opts),
                  Cell("detptq-qdrop", 4, 4, s, extra=EIGHT_BIT_OFF[-1] + TWO_COIN, **opts)]
    return cells


def _loss_norm_suite() -> list[Cell]:
    """The loss-scale experiment at W4A4, seed by seed: does DetPTQ's per-unit p lose to p = 2 inside reconstruction
    because the Lp loss's scale (which spans orders of magnitude across units and p) moves its balance with
    AdaRound's regulariser, whose weight ``lam`` is fixed?

    For each seed, the four reconstruction settings of ``full`` and ``ablations`` at W4A4 (joint; DetPTQ+QDrop at
    ``--quant-prob 1``, DetPTQ's p inside the joint scheme; QDrop and DetPTQ+QDrop with the earlier two coins, as
    they were run) as they are (cells equal to those of ``full``
    and ``ablations``: copy them with ``--reuse``), then the same four with ``--loss-norm before``.
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL, **_recon_opts("W4A4")}
    settings = [("joint", (), ()), ("detptq-qdrop", QUANT_PROB_ONE, ()), ("qdrop", (), TWO_COIN),
                ("detptq-qdrop", (), TWO_COIN)]
    return [Cell(m, 4, 4, s, extra=e + norm + coin, **opts)
            for s in SEEDS for norm in ((), LOSS_NORM_BEFORE) for m, e, coin in settings]


#: The layer protocol of experiment E8, the head in FP (QDrop's COCO code).
HEAD_FP: tuple[str, ...] = ("--protocol", "head-fp")
#: QDrop's keep probabilities of experiment E2 (1.0 is the ``joint`` method, the same code path).
QDROP_PROBS: tuple[float, ...] = (0.75, 0.9)
#: The longer budget of experiment E10 (steps per unit).
LONG_ITERS = 4000


def _recon_suite() -> list[Cell]:
    """The reconstruction experiments at W4A4 (256 calibration images, 500 val images, 1,000 steps per unit at
    :data:`RECON_LR`), ordered by what they decide: seed 0 of every experiment first, then seeds 1 and 2.

    * E1 the methods (:func:`_recon_variants`): published BRECQ (two stages), joint, QDrop (the reference's one
      coin), QDrop with the earlier two coins, DetPTQ+QDrop (one coin and two coins). The same keys as ``full``'s
      W4A4 cells (copy them either way with ``--reuse``).
    * E2 QDrop's keep probability 0.75 and 0.9 (0.5 is E1's QDrop, 1.0 is joint).
    * E9 the step sizes fixed at their starting scales (``--lr-act 0``): joint, BRECQ (its first stage only) and
      QDrop.
    * E8 the ``head-fp`` protocol (the head in FP, as QDrop's COCO code): the E1 methods but the two-coin ones,
      and DetPTQ simple.
    * E3 which half of DetPTQ's p matters, inside the joint scheme (the best of the committed runs): DetPTQ's
      scales with the p = 2 loss (``--detptq-use scales``), the p = 2 scales with DetPTQ's loss (``loss``), and both
      (``ablations``' DetPTQ+QDrop at ``--quant-prob 1``: copy it with ``--reuse``); neither is joint.
    * E4 DetPTQ's p chosen with the later layers quantized (``--rest quantized``), inside the joint scheme.
    * E10 (seed 0 only, after seed 0's other cells) joint and QDrop at :data:`LONG_ITERS` steps per unit: is the
      gap the budget's?
    """
    opts = {"calib": FULL_CALIB, "val": FULL_VAL}
    recon = {**opts, **_recon_opts("W4A4")}

    def seed_cells(s: int) -> list[Cell]:
        e1 = _recon_variants("W4A4", s)
        e2 = [Cell("qdrop", 4, 4, s, extra=("--quant-prob", f"{q:g}"), **recon) for q in QDROP_PROBS]
        fixed = {**recon, "lr_act": 0.0}
        e9 = [Cell("joint", 4, 4, s, **fixed), Cell("brecq", 4, 4, s, **fixed), Cell("qdrop", 4, 4, s, **fixed)]
        e8 = [Cell(c.method, 4, 4, s, lr_v=c.lr_v, lr_act=c.lr_act, iters=c.iters, extra=c.extra + HEAD_FP, **opts)
              for c in e1 if TWO_COIN[1] not in c.extra] + [Cell("detptq", 4, 4, s, extra=HEAD_FP, **opts)]
        e3 = [Cell("detptq-qdrop", 4, 4, s, extra=QUANT_PROB_ONE + use, **recon)
              for use in ((), ("--detptq-use", "scales"), ("--detptq-use", "loss"))]
        e4 = [Cell("detptq-qdrop", 4, 4, s, extra=QUANT_PROB_ONE + ("--rest", "quantized"), **recon)]
        return e1 + e2 + e9 + e8 + e3 + e4

    long = {**recon, "iters": LONG_ITERS}
    return seed_cells(0) + [Cell("joint", 4, 4, 0, **long), Cell("qdrop", 4, 4, 0, **long)] + seed_cells(1) + \
        seed_cells(2)


#: Calibration images of every ``paper`` cell, 128 (half of ``full``'s 256). The issue's rule is 256 unless DetPTQ
#: simple on RetinaNet-R18 takes more than 10 minutes a cell; at 256 its W4A4 cell was still running after 27 minutes
#: (one thread, shared machine), so every R18 cell uses 128, and the book says so.
PAPER_CALIB = 128


def _paper_suite() -> list[Cell]:
    """The rows of the paper's table, for a second detector (run it with ``--model retinanet-r18``: the paper's own
    architecture), ordered so that a partial run answers the paper's orderings at W4A4 (its headline) first.

    * seed 0 at W4A4: min-max, Lp with p = 2 and :data:`LP_EXTRA_P`, DetPTQ simple, then Lp with every other p of
      ``P_DEFAULT`` (the best-fixed-p oracle, as in ``full``);
    * seed 0 at W8A8 and W4A8 (min-max, Lp with p = 2 and :data:`LP_EXTRA_P`, DetPTQ simple), and DetPTQ simple at
      W4A4 under the ``head-fp`` protocol (the head in FP: the row that compares with the paper if it kept its head
      in FP, as QDrop's COCO code does);
    * seeds 1 and 2's cells of the two items above;
    * the reconstruction cells at W4A4, seed 0, under ``head-fp``: published BRECQ, QDrop (the reference's single
      coin) and DetPTQ+QDrop at the budget of :data:`RECON_ITERS` and the rates of :data:`RECON_LR` (as ``full``):
      one seed of the second ordering (DetPTQ+QDrop > QDrop);
    * Lp with every other p of ``P_DEFAULT`` at W4A8, seeds 0, 1, 2: the best-fixed-p oracle at W4A8 too (the first
      ordering, DetPTQ > every fixed p, at both bit widths the paper's table has below 8 bits).

    The same three reconstruction cells under our own protocol (the head quantized) are the suite ``paper-recon``:
    an estimated four hours a cell on one thread (the head's 256-channel convs run on five pyramid levels), against
    one hour under ``head-fp``.

    :data:`PAPER_CALIB` calibration images, mAP on the :data:`FULL_VAL` val images.
    """
    opts = {"calib": PAPER_CALIB, "val": FULL_VAL}
    fixed = [("minmax", None), ("lp", 2.0), ("lp", LP_EXTRA_P), ("detptq", None)]
    sweep = [p for p in P_DEFAULT if p != 2.0]

    def w4a4(s: int) -> list[Cell]:
        return [Cell(m, 4, 4, s, p=p, **opts) for m, p in fixed] + [Cell("lp", 4, 4, s, p=p, **opts) for p in sweep]

    def rest(s: int) -> list[Cell]:
        return [Cell(m, w, a, s, p=p, **opts) for w, a in FULL_BITS[:2] for m, p in fixed] + \
            [Cell("detptq", 4, 4, s, extra=HEAD_FP, **opts)]

    w4a8_sweep = [Cell("lp", 4, 8, s, p=p, **opts) for s in SEEDS for p in sweep]
    return w4a4(0) + rest(0) + w4a4(1) + rest(1) + w4a4(2) + rest(2) + _paper_recon(HEAD_FP) + w4a8_sweep


def _paper_recon(extra: tuple[str, ...]) -> list[Cell]:
    """Published BRECQ, QDrop and DetPTQ+QDrop at W4A4, seed 0, with the ``paper`` suite's images and ``full``'s
    budget, under the protocol that ``extra`` sets (``()``: ours, the head quantized; :data:`HEAD_FP`)."""
    opts = {"calib": PAPER_CALIB, "val": FULL_VAL}
    return [Cell(m, 4, 4, 0, extra=extra, **_recon_opts("W4A4", m), **opts) for m in ("brecq", "qdrop", "detptq-qdrop")]


def _quick_suite() -> list[Cell]:
    """Every method kind once on a tiny slice (8 calibration images, 50 val images, 5 reconstruction steps)."""
    opts = {"calib": 8, "val": 50}
    return [Cell("minmax", 4, 8, 0, **opts), Cell("lp", 4, 8, 0, p=2.0, **opts),
            Cell("detptq", 4, 8, 0, extra=("--odol-cls", "l2", "--odol-loc", "iou"), **opts),
            Cell("brecq", 4, 4, 0, iters=5, **opts), Cell("joint", 4, 4, 0, iters=5, **opts),
            Cell("qdrop", 4, 4, 0, iters=5, **opts),
            Cell("detptq-qdrop", 4, 4, 0, iters=5, extra=EIGHT_BIT_OFF[-1], **opts)]


#: The named suites (``benchmarks/README.md`` has their cell counts and costs).
#:
#: * ``full`` (159 cells): min-max, Lp with every p in ``P_DEFAULT`` = {1, ..., 4.5} and with p = 2.4, DetPTQ simple,
#:   BRECQ, QDrop and DetPTQ+QDrop at W8A8, W4A8, W4A4, W3A3 with calibration seeds 0, 1, 2; 256 calibration
#:   images for every method, mAP on the 500 val images. Reconstruction only below 8 bits, at the budget of
#:   :data:`RECON_ITERS` for its bits and the learning rates :data:`RECON_LR`. "Best fixed p" is not a cell: the
#:   report's :func:`~detptq_mini.benchmark.report.summarize` picks, per bits, the p of ``P_DEFAULT`` with the best
#:   mean mAP over seeds (an oracle choice made on the val set).
#: * ``ablations`` (51 cells): see ``_ablation_suite``; the p-with-and-without-V ablation is the script
#:   ``benchmarks/rounding_ablation.py``.
#: * ``loss-norm`` (24 cells): see ``_loss_norm_suite``.
#: * ``simple`` (66 cells): min-max, every fixed p of ``P_DEFAULT`` and DetPTQ at W4A4 and W4A8, seeds 0, 1, 2, 64
#:   calibration images (the chapter 6 table), and DetPTQ with the rest of the network quantized while a layer's p is
#:   chosen (``--rest quantized``).
#: * ``recon`` (62 cells): the reconstruction experiments at W4A4, calibration seeds 0-2: the baselines (E1), QDrop's
#:   keep probability (E2), which half of DetPTQ's p matters and p chosen with the rest quantized (E3, E4), the head
#:   in FP (E8), fixed step sizes (E9), and 4,000 steps a unit on seed 0 (E10); see ``_recon_suite``.
#: * ``paper`` (84 cells): the paper's rows for a second detector (``--model retinanet-r18``), see ``_paper_suite``.
#: * ``paper-recon`` (3 cells): ``paper``'s reconstruction cells under our protocol (the head quantized), about four
#:   hours a cell (estimated) on RetinaNet-R18 with one thread.
#: * ``quick`` (7 cells): every method once on a tiny slice, a smoke test of the harness (about a minute).
SUITES: dict[str, list[Cell]] = {
    "simple": _simple_suite(),
    "full": _full_suite(),
    "ablations": _ablation_suite(),
    "loss-norm": _loss_norm_suite(),
    "recon": _recon_suite(),
    "paper": _paper_suite(),
    "paper-recon": _paper_recon(()),
    "quick": _quick_suite(),
}


def is_done(rec) -> bool:
    """Whether ``rec`` is the record of a successful cell (a dict with ``"status": "ok"``): a run skips such a cell,
    the report counts it; any other value (a failed cell's record, None for a missing one) is not done."""
    return isinstance(rec, dict) and rec.get("status") == "ok"


def on_model(cells: list[Cell], model: str) -> list[Cell]:
    """The cells run on ``model`` (:data:`~detptq_mini.checkpoint.MODELS`); ``"yolo"`` leaves them as they are."""
    check_choice("model", model, MODELS)
    return [c if c.model == model else replace(c, model=model) for c in cells]


def suite_cells(name_or_cells, model: str = "yolo") -> tuple[str, list[Cell]]:
    """The suite's name and all its cells: a key of :data:`SUITES`, or a non-empty list of :class:`Cell` (named
    ``"custom"``); a suite's cells on ``model`` (:func:`on_model`; a list's cells keep their own). Unlike
    :func:`select_cells`, no filter and no check that the keys are unique."""
    if isinstance(name_or_cells, str):
        if name_or_cells not in SUITES:
            raise ValueError(f"suite={name_or_cells!r} is not a suite; allowed: {', '.join(SUITES)}")
        return name_or_cells, on_model(SUITES[name_or_cells], model)
    cells = list(name_or_cells)
    if not cells or not all(isinstance(c, Cell) for c in cells):
        raise ValueError("name_or_cells must be a suite name or a non-empty list of Cell")
    return "custom", cells


def select_cells(name_or_cells, only: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 argument_names: dict[str, str] | None = None, model: str = "yolo") -> tuple[str, list[Cell]]:
    """The suite's name and cells, keeping those whose key contains ``only`` and not ``exclude`` (error if none is
    left), e.g. ``exclude="-i"``: every cell but the reconstruction cells.

    ``only`` and ``exclude`` are a substring or a list of substrings: a cell is kept when its key contains any of
    ``only`` and none of ``exclude`` (e.g. ``only=["W4A4-s1", "W4A4-s2"]``; on the command line ``--only`` and
    ``--exclude`` are repeatable). ``argument_names`` renames them in errors: the CLI passes ``{"only": "--only",
    "exclude": "--exclude"}``. A name that starts with ``-`` (a command-line flag) is written ``--only 'W4A4'``
    (once per value), as the CLI's own errors; the others ``only='W4A4'``.
    """
    names = {"only": "only", "exclude": "exclude", **(argument_names or {})}

    def show(arg: str, value) -> str:
        if names[arg].startswith("-") and isinstance(value, (list, tuple)):
            return " ".join(shown(names[arg], v) for v in value)
        return shown(names[arg], value)

    def substrings(arg: str, value) -> tuple[str, ...] | None:
        if value is None:
            return None
        values = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"{show(arg, value)} must be a non-empty substring of cell keys, a non-empty list of "
                             "them, or None")
        return values

    name, cells = suite_cells(name_or_cells, model)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("the cells' keys are not unique: each cell must differ")
    wanted, unwanted = substrings("only", only), substrings("exclude", exclude)
    if wanted is not None:
        cells = [c for c in cells if any(v in c.key for v in wanted)]
    if unwanted is not None:
        cells = [c for c in cells if not any(v in c.key for v in unwanted)]
    if not cells:
        what = " and ".join(show(a, v) for a, v in (("only", only), ("exclude", exclude)) if v is not None)
        raise ValueError(f"{what} leaves no cell of suite {name!r} (see `detptq-mini benchmark --list`)")
    return name, cells


