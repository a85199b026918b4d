"""A small YOLO-style detector whose forward can restart from any unit.

Architecture (YOLOv8-like, about 1 M parameters, all widths multiples of 16):

* backbone: ``stem`` (3x3 s2 Conv-BN-SiLU) then four stages of a 3x3 s2
  downsampling conv and a C2f block (a CSP block with split, bottlenecks and
  concat), closed by SPPF;
* neck: a PAN: top-down (upsample, concat, C2f) to stride 8, then bottom-up
  (3x3 s2 conv, concat, C2f) back to stride 32;
* head: decoupled and anchor-free at strides 8/16/32; per level, a class
  branch and a box branch, each two 3x3 Conv-BN-SiLU and a 1x1 prediction conv.

``forward(x)`` returns the raw dense head outputs, a :class:`DenseOutputs`:

* ``cls[l]``: class logits, shape ``(B, K, H_l, W_l)``;
* ``box[l]``: box regressions, shape ``(B, 4, H_l, W_l)``: the distances from
  the location's centre to the left/top/right/bottom box edges, in units of
  the level's stride (non-negative: a softplus ends the box branch);

for the levels ``l = 0, 1, 2`` at strides ``STRIDES = (8, 16, 32)``.
ODOL compares exactly these tensors. :func:`decode` and :func:`postprocess`
(``torchvision.ops.batched_nms``) turn them into detections.

**Units.** The forward is a short program of *units* (the reconstruction
units of BRECQ/QDrop): stem, each downsampling conv, each C2f block, SPPF and
each head branch, listed in forward order by stable names (``model.units``).
Each unit reads named tensors and writes one. Because the PAN neck reads
earlier backbone outputs, the input of unit ``k`` is in general several
tensors: ``model.live_names(k)`` names them, ``model.capture(x, k)`` computes
them, and ``model.forward_from(k, cache)`` restarts the forward there, so a
later unit can be re-evaluated without recomputing the prefix. That machinery
is :class:`UnitDetector`, the base class of every detector the library
quantizes: :class:`Detector` (this one) and
:class:`detptq_mini.adapter.RetinaNetAdapter` only declare their units, their
outputs and how images enter the first unit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

__all__ = [
    "STRIDES", "DenseOutputs", "Unit", "UnitDetector", "check_unit_detector", "DetectorConfig", "Detector", "ConvBNAct",
    "C2f", "SPPF", "make_anchors", "decode", "postprocess",
]

STRIDES: tuple[int, ...] = (8, 16, 32)


class DenseOutputs(NamedTuple):
    """Raw dense head outputs: per level, class logits ``(B, K, H, W)`` and ltrb distances ``(B, 4, H, W)``."""

    cls: tuple[Tensor, ...]
    box: tuple[Tensor, ...]


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU; the unit of the whole network."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ConvBNAct with a residual add."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block (YOLOv8's C2f): 1x1 conv, split in two, ``n`` bottlenecks on one half, concat all, 1x1 conv.

    With ``upsample=True`` or several inputs it first merges them (nearest 2x upsampling of the first input,
    then channel concat), as the PAN neck needs.
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, upsample: bool = False):
        super().__init__()
        self.c = c_out // 2
        self.upsample = upsample
        self.cv1 = ConvBNAct(c_in, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * self.c, c_out, 1)

    def forward(self, *xs: Tensor) -> Tensor:
        if self.upsample:
            xs = (F.interpolate(xs[0], scale_factor=2.0, mode="nearest"),) + xs[1:]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        y = list(self.cv1(x).chunk(2, dim=1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): 1x1 conv, three chained 5x5 max-pools, concat, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        c = c_in // 2
        self.cv1 = ConvBNAct(c_in, c, 1)
        self.cv2 = ConvBNAct(4 * c, c_out, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, dim=1))


class Branch(nn.Module):
    """One head branch: two 3x3 ConvBNAct and a 1x1 prediction conv (``pred``), with a softplus for boxes."""

    def __init__(self, c_in: int, c: int, n_out: int, positive: bool, prior: float | None = None):
        super().__init__()
        self.cv1 = ConvBNAct(c_in, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.pred = nn.Conv2d(c, n_out, 1)
        self.positive = positive
        if prior is not None:  # focal-loss style prior on the class logits
            nn.init.constant_(self.pred.bias, -torch.log(torch.tensor((1 - prior) / prior)).item())
        else:
            nn.init.constant_(self.pred.bias, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pred(self.cv2(self.cv1(x)))
        return F.softplus(y) if self.positive else y


@dataclass(frozen=True)
class Unit:
    """One step of the forward program: ``outputs = module(*[env[n] for n in inputs])``."""

    name: str  # stable module path, e.g. "backbone.c2f2" or "head.p3.cls"
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class DetectorConfig:
    """Widths and depths of :class:`Detector` (the shipped model uses the defaults)."""

    num_classes: int = 4
    widths: tuple[int, int, int, int, int] = (16, 32, 64, 96, 128)
    depths: tuple[int, int, int, int] = (1, 2, 2, 1)
    neck_depth: int = 1
    head_width: int = 48


class UnitDetector(nn.Module):
    """Base class of a restartable detector: the forward as a program of named units.

    Everything after this module (quantization, the Lp scale search, ODOL, DetPTQ's selection of p, block
    reconstruction) talks to a detector through this class. A subclass provides three pieces, in ``__init__``
    or as methods:

    * ``units``: the forward as a tuple of :class:`Unit` ``(name, inputs, output)`` in forward order, where
      ``name`` is the path of a submodule and ``env[output] = get_submodule(name)(*[env[n] for n in inputs])``;
      the first units read ``"image"``;
    * ``outputs``: ``((class-logit tensor names, ...), (box tensor names, ...))``, one name per level, read
      from the final ``env`` by :meth:`collect`;
    * :meth:`prepare`: images ``(B, 3, H, W)`` in [0, 1] -> the tensor ``"image"`` the first unit reads.

    The base class gives the rest: :meth:`run` (execute units ``start:stop`` on a dict of named tensors),
    :meth:`capture` and :meth:`forward_from` (restart the forward at a unit), :meth:`live_names`,
    :meth:`dependents`, the unit lookups (:attr:`unit_names`, :meth:`unit_index`, :meth:`unit_of`,
    :meth:`conv_names`, :meth:`head_units`), :meth:`collect` and ``forward(x) = collect(run({"image": prepare(x)}))``.

    A subclass is checked when it is built (after its ``__init__``): a missing or malformed ``units`` or
    ``outputs``, or a ``prepare`` left abstract, is a ValueError naming the missing piece.
    """

    units: tuple[Unit, ...]
    outputs: tuple[tuple[str, ...], tuple[str, ...]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def checked_init(self, *args, **kw):
            init(self, *args, **kw)
            if type(self).__init__ is checked_init:  # the outermost __init__ has run: the object is complete
                self._check_built()

        cls.__init__ = checked_init

    def _check_built(self) -> None:
        """Raise a ValueError naming the first missing or malformed piece of the subclass."""
        what = type(self).__name__
        units, outputs = getattr(self, "units", None), getattr(self, "outputs", None)
        if units is None:
            raise ValueError(f"{what} is not a complete UnitDetector: it sets no `units` (the forward as a tuple of "
                             "Unit(name, inputs, output), in forward order)")
        if not isinstance(units, tuple) or not units or not all(isinstance(u, Unit) for u in units):
            raise ValueError(f"{what}.units must be a non-empty tuple of Unit(name, inputs, output), got {units!r}")
        if outputs is None:
            raise ValueError(f"{what} is not a complete UnitDetector: it sets no `outputs` (the pair ((class-logit "
                             "tensor names, ...), (box tensor names, ...)) of the final tensors)")
        if not (isinstance(outputs, tuple) and len(outputs) == 2 and all(
                isinstance(g, tuple) and g and all(isinstance(n, str) for n in g) for g in outputs)):
            raise ValueError(f"{what}.outputs must be a pair ((class-logit tensor names, ...), (box tensor names, "
                             f"...)) of non-empty tuples, got {outputs!r}")
        if type(self).prepare is UnitDetector.prepare:
            raise ValueError(f"{what} is not a complete UnitDetector: it does not implement `prepare(x)` "
                             "(images (B, 3, H, W) in [0, 1] -> the tensor 'image' the first unit reads)")
        names = [u.name for u in units]
        if len(set(names)) != len(names):
            raise ValueError(f"{what}.units: unit names must be unique, got {names}")
        produced = {"image"}
        for u in units:
            try:
                self.get_submodule(u.name)
            except AttributeError:
                raise ValueError(f"{what}.units: unit {u.name!r} is not a submodule of the model") from None
            missing = [n for n in u.inputs if n not in produced]
            if missing:
                raise ValueError(f"{what}.units: unit {u.name!r} reads {missing}, which no earlier unit writes")
            produced.add(u.output)
        missing = [n for group in outputs for n in group if n not in produced]
        if missing:
            raise ValueError(f"{what}.outputs names {missing}, which no unit writes")

    # ------------------------------------------------------------------ units
    @property
    def unit_names(self) -> tuple[str, ...]:
        """Reconstruction units, in forward order."""
        return tuple(u.name for u in self.units)

    def head_units(self) -> tuple[str, ...]:
        """The head's units, in forward order: by default the units whose output is one of the detector's outputs
        (what :meth:`collect` reads, named by ``outputs``).

        The layer protocol ``"head-fp"`` (:class:`detptq_mini.quant.QuantConfig`) leaves every conv of these units in
        FP. The default fits a head whose branches each end in an output tensor (the shipped detector's six
        ``head.p{3,4,5}.{cls,box}``, RetinaNet's ``head.cls`` and ``head.box``); a subclass whose head spans further
        units (e.g. a shared stem before the branches) overrides this.
        """
        produced = {n for group in self.outputs for n in group}
        return tuple(u.name for u in self.units if u.output in produced)

    def conv_names(self) -> tuple[str, ...]:
        """Every Conv2d by its stable module path, in forward (unit) order."""
        names = []
        for u in self.units:
            unit = self.get_submodule(u.name)
            names += [f"{u.name}.{n}" if n else u.name for n, m in unit.named_modules() if isinstance(m, nn.Conv2d)]
        return tuple(names)

    def unit_index(self, unit: int | str) -> int:
        """Position of a unit given by index or name; a clear error otherwise."""
        if isinstance(unit, str):
            if unit not in self.unit_names:
                raise ValueError(f"unit={unit!r} is not a unit of this model; allowed: {', '.join(self.unit_names)}")
            return self.unit_names.index(unit)
        if not 0 <= unit <= len(self.units):
            raise ValueError(f"unit={unit} out of range 0..{len(self.units)}")
        return int(unit)

    def unit_of(self, conv_name: str) -> str:
        """The unit that contains a conv (by its stable name)."""
        for u in self.unit_names:
            if conv_name == u or conv_name.startswith(u + "."):
                return u
        raise ValueError(f"conv_name={conv_name!r} is not a conv of this model; see model.conv_names()")

    def live_names(self, unit: int | str) -> tuple[str, ...]:
        """Names of the tensors alive just before unit ``unit``: produced earlier and read by it or later."""
        k = self.unit_index(unit)
        produced = {"image"} | {u.output for u in self.units[:k]}
        needed = {n for u in self.units[k:] for n in u.inputs} | {n for group in self.outputs for n in group}
        order = ["image"] + [u.output for u in self.units[:k]]
        return tuple(n for n in order if n in produced and n in needed)

    def dependents(self, unit: int | str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The later units that read unit ``unit``'s output (directly or through other units), and the others.

        Returns:
            ``(on, off)``: the indices of the units after ``unit`` that depend on its output, and of those that do
            not, each in forward order. Re-running ``unit`` with other weights changes only the ``on`` units.
        """
        k = self.unit_index(unit)
        if k == len(self.units):
            raise ValueError(f"unit={unit} out of range 0..{len(self.units) - 1}")
        dep, on, off = {self.units[k].output}, [], []
        for j in range(k + 1, len(self.units)):
            if any(n in dep for n in self.units[j].inputs):
                dep.add(self.units[j].output)
                on.append(j)
            else:
                off.append(j)
        return tuple(on), tuple(off)

    def run(self, env: dict[str, Tensor], start: int | str = 0, stop: int | str | None = None) -> dict[str, Tensor]:
        """Execute units ``start:stop`` on the named tensors in ``env``; returns the updated (new) dict."""
        a = self.unit_index(start)
        b = len(self.units) if stop is None else self.unit_index(stop)
        env = dict(env)
        for u in self.units[a:b]:
            try:
                args = [env[n] for n in u.inputs]
            except KeyError as e:
                raise ValueError(f"unit {u.name!r} needs tensor {e.args[0]!r}; pass the cache of "
                                 f"model.capture(x, {a})") from None
            env[u.output] = self.get_submodule(u.name)(*args)
        return env

    def capture(self, x: Tensor, unit: int | str) -> dict[str, Tensor]:
        """Run the prefix on images ``x`` and return the live tensors before ``unit`` (see :meth:`live_names`)."""
        k = self.unit_index(unit)
        env = self.run({"image": self.prepare(x)}, 0, k)
        return {n: env[n] for n in self.live_names(k)}

    def forward_from(self, unit: int | str, cache: dict[str, Tensor]) -> DenseOutputs:
        """Restart the forward at ``unit`` from the live tensors ``cache`` (as returned by :meth:`capture`)."""
        return self.collect(self.run(cache, unit))

    # ---------------------------------------------------------------- forward
    def prepare(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> the tensor ``"image"`` the first unit reads (a subclass defines it)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare(x)")

    def collect(self, env: dict[str, Tensor]) -> DenseOutputs:
        """The dense head outputs named by ``outputs`` in the final tensors ``env`` of :meth:`run`."""
        return DenseOutputs(tuple(env[n] for n in self.outputs[0]), tuple(env[n] for n in self.outputs[1]))

    def forward(self, x: Tensor) -> DenseOutputs:
        """Raw dense head outputs for images ``x`` ``(B, 3, H, W)`` in [0, 1]."""
        return self.collect(self.run({"image": self.prepare(x)}))


def check_unit_detector(model, name: str = "model") -> None:
    """Raise a ValueError unless ``model`` is a :class:`UnitDetector` (``name`` is the argument in the message)."""
    if not isinstance(model, UnitDetector):
        raise ValueError(f"{name} must be a UnitDetector (a restartable detector: detptq_mini.model.Detector, "
                         "detptq_mini.adapter.RetinaNetAdapter or another subclass of "
                         f"detptq_mini.model.UnitDetector); got {type(model).__name__}")


class Detector(UnitDetector):
    """The YOLO-style detector (see the module docstring for the architecture and output structure)."""

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        super().__init__()
        self.config = config
        w, d, k = config.widths, config.depths, config.num_classes
        self.num_classes = k
        self.strides = STRIDES
        self.backbone = nn.Module()
        bb = self.backbone
        bb.stem = ConvBNAct(3, w[0], 3, 2)
        bb.down1, bb.c2f1 = ConvBNAct(w[0], w[1], 3, 2), C2f(w[1], w[1], d[0])
        bb.down2, bb.c2f2 = ConvBNAct(w[1], w[2], 3, 2), C2f(w[2], w[2], d[1])
        bb.down3, bb.c2f3 = ConvBNAct(w[2], w[3], 3, 2), C2f(w[3], w[3], d[2])
        bb.down4, bb.c2f4 = ConvBNAct(w[3], w[4], 3, 2), C2f(w[4], w[4], d[3])
        bb.sppf = SPPF(w[4], w[4])
        self.neck = nn.Module()
        nk, n = self.neck, config.neck_depth
        nk.td4 = C2f(w[4] + w[3], w[3], n, shortcut=False, upsample=True)
        nk.td3 = C2f(w[3] + w[2], w[2], n, shortcut=False, upsample=True)
        nk.down3 = ConvBNAct(w[2], w[2], 3, 2)
        nk.bu4 = C2f(w[2] + w[3], w[3], n, shortcut=False)
        nk.down4 = ConvBNAct(w[3], w[3], 3, 2)
        nk.bu5 = C2f(w[3] + w[4], w[4], n, shortcut=False)
        self.head = nn.Module()
        for lvl, c_in in zip(("p3", "p4", "p5"), (w[2], w[3], w[4])):
            level = nn.Module()
            level.cls = Branch(c_in, config.head_width, k, positive=False, prior=0.01)
            level.box = Branch(c_in, config.head_width, 4, positive=True)
            setattr(self.head, lvl, level)
        self.units: tuple[Unit, ...] = (
            Unit("backbone.stem", ("image",), "stem"),
            Unit("backbone.down1", ("stem",), "down1"),
            Unit("backbone.c2f1", ("down1",), "c2f1"),
            Unit("backbone.down2", ("c2f1",), "down2"),
            Unit("backbone.c2f2", ("down2",), "c3"),
            Unit("backbone.down3", ("c3",), "down3"),
            Unit("backbone.c2f3", ("down3",), "c4"),
            Unit("backbone.down4", ("c4",), "down4"),
            Unit("backbone.c2f4", ("down4",), "c2f4"),
            Unit("backbone.sppf", ("c2f4",), "c5"),
            Unit("neck.td4", ("c5", "c4"), "t4"),
            Unit("neck.td3", ("t4", "c3"), "n3"),
            Unit("neck.down3", ("n3",), "nd3"),
            Unit("neck.bu4", ("nd3", "t4"), "n4"),
            Unit("neck.down4", ("n4",), "nd4"),
            Unit("neck.bu5", ("nd4", "c5"), "n5"),
            Unit("head.p3.cls", ("n3",), "cls3"),
            Unit("head.p3.box", ("n3",), "box3"),
            Unit("head.p4.cls", ("n4",), "cls4"),
            Unit("head.p4.box", ("n4",), "box4"),
            Unit("head.p5.cls", ("n5",), "cls5"),
            Unit("head.p5.box", ("n5",), "box5"),
        )
        self.outputs = (("cls3", "cls4", "cls5"), ("box3", "box4", "box5"))
        self.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- forward
    def prepare(self, x: Tensor) -> Tensor:
        """Check images ``(B, 3, H, W)``: float, sides multiples of 32; channels-last for the convs."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {tuple(x.shape[-2:])}")
        if not x.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {x.dtype}")
        return x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def detect(self, x: Tensor, score_thresh: float = 0.001, iou_thresh: float = 0.6, max_det: int = 100) -> list[dict[str, Tensor]]:
        """Detections per image: ``{"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,)}`` after NMS."""
        return postprocess(self(x), score_thresh, iou_thresh, max_det)



# --------------------------------------------------------------------- decoding
def make_anchors(shapes: list[tuple[int, int]], strides=STRIDES, device=None) -> tuple[Tensor, Tensor]:
    """Location centres ``(A, 2)`` in pixels (x, y) and their strides ``(A,)``, levels concatenated."""
    centres, stride_list = [], []
    for (h, w), s in zip(shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        centres.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], dim=1).float())
        stride_list.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(centres), torch.cat(stride_list)


def flatten_levels(out: DenseOutputs) -> tuple[Tensor, Tensor]:
    """Concatenate levels: class logits ``(B, A, K)`` and ltrb distances ``(B, A, 4)`` (stride units)."""
    cls = torch.cat([c.flatten(2) for c in out.cls], dim=2).transpose(1, 2)
    box = torch.cat([b.flatten(2) for b in out.box], dim=2).transpose(1, 2)
    return cls, box


def distances_to_boxes(dist: Tensor, centres: Tensor, strides: Tensor) -> Tensor:
    """ltrb distances in stride units ``(..., A, 4)`` -> xyxy pixel boxes ``(..., A, 4)``."""
    d = dist * strides[:, None]
    return torch.cat([centres - d[..., :2], centres + d[..., 2:]], dim=-1)


def decode(out: DenseOutputs) -> tuple[Tensor, Tensor]:
    """Dense outputs -> (class probabilities ``(B, A, K)``, xyxy pixel boxes ``(B, A, 4)``)."""
    cls, dist = flatten_levels(out)
    centres, strides = make_anchors([tuple(c.shape[-2:]) for c in out.cls], device=cls.device)
    return cls.sigmoid(), distances_to_boxes(dist, centres, strides)


def postprocess(out: DenseOutputs, score_thresh: float = 0.001, iou_thresh: float = 0.6, max_det: int = 100,
                pre_nms: int = 1000) -> list[dict[str, Tensor]]:
    """Decode and run class-wise NMS (``torchvision.ops.batched_nms``) per image.

    Every (location, class) pair above ``score_thresh`` is a candidate (multi-label), the ``pre_nms`` best are
    kept, NMS at ``iou_thresh`` per class, then the ``max_det`` best.
    """
    scores, boxes = decode(out)
    results = []
    k = scores.shape[-1]
    for sc, bx in zip(scores, boxes):
        flat = sc.flatten()
        keep = (flat > score_thresh).nonzero().squeeze(1)
        if keep.numel() > pre_nms:
            keep = keep[flat[keep].topk(pre_nms).indices]
        s, loc, lab = flat[keep], keep // k, keep % k
        b = bx[loc]
        kept = batched_nms(b, s, lab, iou_thresh)[:max_det]
        results.append({"boxes": b[kept], "scores": s[kept], "labels": lab[kept]})
    return results
