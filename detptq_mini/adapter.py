"""Your own detector: an adapter that makes torchvision's RetinaNet a restartable detector.

Everything after :mod:`detptq_mini.model` (quantization, the Lp scale search, ODOL, DetPTQ's p selection,
reconstruction) talks to the detector through one base class, :class:`~detptq_mini.model.UnitDetector`, which
:class:`~detptq_mini.model.Detector` subclasses. An adapter subclasses it too and provides three pieces; the
base class gives the restartable forward built on them:

==================  ==============================================================================
the adapter gives   what it is
==================  ==============================================================================
``units``           the forward as a tuple of :class:`~detptq_mini.model.Unit` (``name, inputs,
                    output``): ``env[output] = get_submodule(name)(*[env[n] for n in inputs])``
``outputs``         ``((class-logit tensor names, ...), (box tensor names, ...))`` in the final env
``prepare(x)``      images ``(B, 3, H, W)`` in [0, 1] -> the tensor ``"image"`` the first unit reads
==================  ==============================================================================

==================  ==============================================================================
the base gives      what it is
==================  ==============================================================================
``run``             execute units ``start:stop`` on a dict of named tensors
``capture``         the live tensors before a unit (``capture(x, 0) == {"image": prepare(x)}``)
``forward_from``    restart the forward at a unit from those tensors
``collect``,        the :class:`~detptq_mini.model.DenseOutputs` named by ``outputs``, and
``forward``         ``forward(x) = collect(run({"image": prepare(x)}))``
``live_names``,     bookkeeping: which tensors are alive before a unit, which later units depend on a
``dependents``,     unit's output, unit lookup by name or index, the unit that holds a conv, every
``unit_index``,     conv in forward order, the head's units (those that write an output: what the
``unit_of``,        layer protocol ``"head-fp"`` leaves in FP)
``conv_names``,
``head_units``
==================  ==============================================================================

An adapter that lacks a piece (no ``units`` or ``outputs``, ``prepare`` not implemented, a unit that is not a
submodule or reads a tensor no earlier unit writes) fails when it is built, with a ValueError naming the piece.

:class:`RetinaNetAdapter` is that subclass for ``torchvision.models.detection.RetinaNet`` with a ResNet-FPN
backbone (``retinanet_resnet50_fpn`` and ``_v2``), so the same ``run_ptq(..., "detptq")`` call quantizes it.

**The paper's detector on the shapes** (``--model retinanet-r18``): :func:`build_retinanet_r18` builds
RetinaNet-ResNet18-FPN as torchvision builds it (256-channel FPN and head, P3-P7), from scratch and trainable:
``resnet_fpn_backbone("resnet18", weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5,
returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))`` (torchvision's defaults, ``FrozenBatchNorm2d`` and
three trainable stages, would freeze a random stem and ``layer1``), ``min_size = max_size = 128`` (our images, not
resized). Its anchors are :data:`R18_ANCHOR_SIZES` [ours]: torchvision's sizes times 3/8 (12 px at P3 instead of
32 px), because our objects are 8-54 px on 128 px images (the book's method page says why).
:func:`retinanet_r18_detector` gives the frozen-BN adapter of such a model, which is what a checkpoint of
``--model retinanet-r18`` loads into; :class:`RetinaNetConfig` is its (stored) configuration.

Units (each a real module; calling it on the unit's input tensors gives its single output tensor, which is
what block reconstruction needs):

* ``body.stem`` (conv1, BN, ReLU, max-pool) and one unit per ResNet bottleneck (``body.layer1.0`` ...);
* the FPN, one unit per step: the lateral 1x1 conv plus the top-down sum (``fpn.lat5``, ``fpn.lat4``,
  ``fpn.lat3``), the 3x3 output conv of each level (``fpn.out5`` ...), and ``fpn.p6``, ``fpn.p7``;
* the head: RetinaNet's class and box subnets are *shared* by the five levels (one set of weights, so one
  quantizer per conv), so each is one unit that runs on all levels: ``head.cls`` and ``head.box``.

Outputs for ODOL [ours]. RetinaNet predicts, at every location of level ``l``, ``A = 9`` anchors: class
logits ``(B, A*K, H_l, W_l)`` and box deltas ``(B, A*4, H_l, W_l)`` (``dx, dy, dw, dh`` relative to the
anchor, the form its decoder consumes). ODOL is a mean over predictions, whatever level they come from,
so the head units return every prediction of every level packed along one axis, in torchvision's own
order (level, then row, column, anchor): class logits ``(B, K, N, 1)`` and deltas ``(B, 4, N, 1)`` with
``N = sum_l H_l W_l A``. ODOL then sees ``N`` "locations" of one "level": the Bernoulli KL over classes
and the foreground-weighted L1 over the 4 deltas are exactly DetPTQ's terms for an anchor-based head.
``loc="iou"`` (which decodes ltrb distances at strides) does not apply to deltas.

BN. A RetinaNet loaded with real weights has ``FrozenBatchNorm2d`` in its ResNet;
:func:`detptq_mini.quant.fold_bn` folds it (as it folds ``nn.BatchNorm2d``), and :func:`freeze_batchnorm`
turns a freshly built model (``weights=None`` gives ``nn.BatchNorm2d``) into that form.

Convention: the stem conv is the first conv in forward order and the two prediction convs are named
``head.cls.pred`` and ``head.box.pred``, so :func:`detptq_mini.quant.quantize_model` keeps them at W8A8 by
default, as for the shipped detector. The head units (``head_units()``) are ``head.cls`` and ``head.box``: the
layer protocol ``"head-fp"`` leaves their convs (subnets and predictions) in FP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .checks import check_int
from .model import DenseOutputs, Unit, UnitDetector

__all__ = ["RetinaNetAdapter", "freeze_batchnorm", "SharedHead", "TopDown", "RetinaNetConfig", "DEFAULT_ANCHOR_SIZES",
           "R18_ANCHOR_SIZES", "ASPECT_RATIOS", "build_retinanet_r18", "retinanet_r18_detector"]


def _anchor_sizes(base: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Three sizes an octave third apart at each level, from each level's base size (torchvision's pattern)."""
    return tuple((x, round(x * 2 ** (1 / 3), 2), round(x * 2 ** (2 / 3), 2)) for x in base)


#: torchvision's RetinaNet anchor sizes in pixels, per level P3..P7 (its ``_default_anchorgen``, the int() included):
#: (32, 40, 50) at P3 ... (512, 645, 812) at P7.
DEFAULT_ANCHOR_SIZES: tuple[tuple[float, ...], ...] = tuple(
    (float(x), float(int(x * 2 ** (1 / 3))), float(int(x * 2 ** (2 / 3)))) for x in (32, 64, 128, 256, 512))
#: Our anchor sizes [ours], torchvision's times 3/8, base 12, 24, 48, 96, 192 px at P3..P7 (strides 8..128), three
#: sizes per level an octave third apart, for the shapes' 8-54 px boxes. Of the 27,850 boxes of the 8,000 training
#: images, an anchor overlaps 87 % at IoU >= 0.5 (the matcher's foreground threshold) against 54 % for torchvision's
#: sizes (none of the boxes under 16 px), and the base 8 of a plain division by 4 reaches 65 %
#: (``detptq-mini train --model retinanet-r18 --check-anchors --train-size 8000``; ``anchor_recall`` in
#: :mod:`detptq_mini.train`).
R18_ANCHOR_SIZES: tuple[tuple[float, ...], ...] = _anchor_sizes((12.0, 24.0, 48.0, 96.0, 192.0))
#: Anchor aspect ratios (height / width) at every level, torchvision's.
ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class RetinaNetConfig:
    """What builds ``--model retinanet-r18`` (stored as the ``config`` of its checkpoints).

    Attributes:
        num_classes: K, the shapes' 4 classes.
        image_size: images are ``image_size`` square; RetinaNet's ``min_size = max_size = image_size`` (no resize).
        anchor_sizes: per level P3..P7, the anchor sizes in pixels (:data:`R18_ANCHOR_SIZES`).
        aspect_ratios: the aspect ratios of every level (:data:`ASPECT_RATIOS`).
    """

    num_classes: int = 4
    image_size: int = 128
    anchor_sizes: tuple[tuple[float, ...], ...] = R18_ANCHOR_SIZES
    aspect_ratios: tuple[float, ...] = ASPECT_RATIOS

    def __post_init__(self):
        check_int("num_classes", self.num_classes, 1)
        check_int("image_size", self.image_size, 32)
        sizes = tuple(tuple(float(v) for v in level) for level in self.anchor_sizes)
        if len(sizes) != 5 or len({len(level) for level in sizes}) != 1 or not all(
                v > 0 for level in sizes for v in level):
            raise ValueError(f"anchor_sizes={self.anchor_sizes!r} must give 5 levels (P3..P7) of the same number of "
                             "sizes > 0, in pixels")
        ratios = tuple(float(r) for r in self.aspect_ratios)
        if not ratios or not all(r > 0 for r in ratios):
            raise ValueError(f"aspect_ratios={self.aspect_ratios!r} must be a non-empty tuple of numbers > 0")
        object.__setattr__(self, "anchor_sizes", sizes)
        object.__setattr__(self, "aspect_ratios", ratios)


def build_retinanet_r18(config: RetinaNetConfig = RetinaNetConfig()) -> RetinaNet:
    """torchvision's RetinaNet-ResNet18-FPN from scratch, every layer trainable with ``nn.BatchNorm2d`` (for training).

    Returns the torchvision model (train mode as built): in train mode ``model(images, targets)`` gives torchvision's
    own RetinaNet losses (focal loss and L1 on the box deltas); :func:`retinanet_r18_detector` wraps a trained one.
    """
    if not isinstance(config, RetinaNetConfig):
        raise ValueError(f"config must be a RetinaNetConfig, got {type(config).__name__}")
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    anchors = AnchorGenerator(config.anchor_sizes, (config.aspect_ratios,) * len(config.anchor_sizes))
    return RetinaNet(backbone, config.num_classes, min_size=config.image_size, max_size=config.image_size,
                     anchor_generator=anchors)


def retinanet_r18_detector(config: RetinaNetConfig = RetinaNetConfig(),
                           model: RetinaNet | None = None) -> "RetinaNetAdapter":
    """The restartable detector of ``--model retinanet-r18``: ``model`` (default: a fresh
    :func:`build_retinanet_r18`) with its BN frozen (:func:`freeze_batchnorm`, folded later by quantization, as for
    any RetinaNet), wrapped by :class:`RetinaNetAdapter`; eval mode, ``.config`` set to ``config``."""
    if model is None:
        model = build_retinanet_r18(config)
    adapter = RetinaNetAdapter(freeze_batchnorm(model).eval())
    adapter.config = config
    return adapter

_RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.BatchNorm2d`` replaced by torchvision's ``FrozenBatchNorm2d``.

    The frozen copy keeps the affine parameters and running statistics (and ``eps``), so in eval mode it
    computes the same function; it is the form torchvision detectors take when built with real weights.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.running_mean.device)
                with torch.no_grad():
                    frozen.weight.copy_(child.weight if child.affine else torch.ones_like(frozen.weight))
                    frozen.bias.copy_(child.bias if child.affine else torch.zeros_like(frozen.bias))
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                module._modules[name] = frozen
    return model


class TopDown(nn.Module):
    """One FPN merge step: ``lateral(c) + nearest_upsample(top, size of c)`` (``top`` omitted at the top level)."""

    def __init__(self, lateral: nn.Module):
        super().__init__()
        self.lateral = lateral

    def forward(self, c: Tensor, top: Tensor | None = None) -> Tensor:
        y = self.lateral(c)
        if top is not None:
            y = y + F.interpolate(top, size=c.shape[-2:], mode="nearest")
        return y


class SharedHead(nn.Module):
    """A RetinaNet subnet shared by all levels: ``pred(subnet(p_l))`` for each level, packed for ODOL.

    Returns ``(B, C, N, 1)``: the ``(B, A*C, H_l, W_l)`` map of each level reordered to torchvision's
    ``(B, H_l W_l A, C)``, the levels concatenated (``N = sum_l H_l W_l A``), then channels first.
    """

    def __init__(self, subnet: nn.Module, pred: nn.Conv2d, channels: int):
        super().__init__()
        self.subnet, self.pred, self.channels = subnet, pred, channels

    def forward(self, *levels: Tensor) -> Tensor:
        out = []
        for p in levels:
            y = self.pred(self.subnet(p))
            b, _, h, w = y.shape
            out.append(y.view(b, -1, self.channels, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, self.channels))
        return torch.cat(out, dim=1).permute(0, 2, 1).unsqueeze(-1)


def _check_retinanet(model) -> None:
    if not isinstance(model, RetinaNet):
        raise ValueError(f"model must be a torchvision.models.detection.RetinaNet (e.g. retinanet_resnet50_fpn"
                         f"(weights=None, weights_backbone=None)), got {type(model).__name__}")
    bb = model.backbone
    body = getattr(bb, "body", None)
    if not isinstance(bb, BackboneWithFPN) or not all(hasattr(body, a) for a in
                                                      ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4")):
        raise ValueError("model.backbone must be torchvision's ResNet-FPN (BackboneWithFPN with a ResNet body), "
                         f"got {type(bb).__name__}")
    if dict(body.return_layers) != _RETURN_LAYERS or not isinstance(bb.fpn.extra_blocks, LastLevelP6P7):
        raise ValueError(f"model.backbone must return layers {_RETURN_LAYERS} and add P6/P7 (LastLevelP6P7), as "
                         f"retinanet_resnet50_fpn does; got {dict(body.return_layers)} and "
                         f"{type(bb.fpn.extra_blocks).__name__}")


class RetinaNetAdapter(UnitDetector):
    """torchvision's RetinaNet as a restartable detector (see the module docstring).

    The adapter owns a deep copy of ``model``'s modules (the input model is not modified), regrouped into
    units; it computes exactly what ``model`` computes in eval mode. ``forward(x)`` returns the dense head
    outputs as a :class:`~detptq_mini.model.DenseOutputs` with one packed level (class logits ``(B, K, N, 1)``
    and box deltas ``(B, 4, N, 1)``); :meth:`detect` returns torchvision's post-NMS detections.

    Args:
        model: a ``torchvision.models.detection.RetinaNet`` with a ResNet-FPN backbone returning ``layer2..4``
            and P6/P7 (``retinanet_resnet50_fpn``, ``retinanet_resnet50_fpn_v2``).

    Raises:
        ValueError: ``model`` is not such a RetinaNet.
    """

    def __init__(self, model: RetinaNet):
        super().__init__()
        _check_retinanet(model)
        self.config = None  # a RetinaNetConfig when built by retinanet_r18_detector
        src = copy.deepcopy(model).eval()
        body, fpn = src.backbone.body, src.backbone.fpn
        cls_head, box_head = src.head.classification_head, src.head.regression_head
        self.num_classes = int(cls_head.num_classes)
        self.num_anchors = int(cls_head.num_anchors)
        # what detect() needs from torchvision (no parameters)
        self.transform, self.anchor_generator, self.box_coder = src.transform, src.anchor_generator, src.box_coder
        for attr in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"):
            setattr(self, attr, getattr(src, attr))

        self.body = nn.Module()
        self.body.stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
        units = [Unit("body.stem", ("image",), "c1")]
        prev = "c1"
        for stage in range(1, 5):
            layer = getattr(body, f"layer{stage}")
            setattr(self.body, f"layer{stage}", layer)
            for i in range(len(layer)):
                out = f"c{stage + 1}" if i == len(layer) - 1 else f"c{stage + 1}_{i}"
                units.append(Unit(f"body.layer{stage}.{i}", (prev,), out))
                prev = out

        self.fpn = nn.Module()
        f = self.fpn
        f.lat5, f.lat4, f.lat3 = (TopDown(fpn.inner_blocks[i]) for i in (2, 1, 0))
        f.out5, f.out4, f.out3 = (fpn.layer_blocks[i] for i in (2, 1, 0))
        extra = fpn.extra_blocks
        f.p6, f.p7 = extra.p6, nn.Sequential(nn.ReLU(), extra.p7)
        units += [
            Unit("fpn.lat5", ("c5",), "m5"),
            Unit("fpn.out5", ("m5",), "p5"),
            Unit("fpn.lat4", ("c4", "m5"), "m4"),
            Unit("fpn.out4", ("m4",), "p4"),
            Unit("fpn.lat3", ("c3", "m4"), "m3"),
            Unit("fpn.out3", ("m3",), "p3"),
            Unit("fpn.p6", ("p5" if extra.use_P5 else "c5",), "p6"),
            Unit("fpn.p7", ("p6",), "p7"),
        ]
        self.head = nn.Module()
        self.head.cls = SharedHead(cls_head.conv, cls_head.cls_logits, self.num_classes)
        self.head.box = SharedHead(box_head.conv, box_head.bbox_reg, 4)
        levels = ("p3", "p4", "p5", "p6", "p7")
        units += [Unit("head.cls", levels, "cls"), Unit("head.box", levels, "box")]
        self.levels = levels
        self.units: tuple[Unit, ...] = tuple(units)
        self.outputs = (("cls",), ("box",))
        self.eval()

    # ------------------------------------------------------------ forward
    def prepare(self, x: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> RetinaNet's input: resized, normalized, padded (its transform)."""
        return self._image_list(x)[0].tensors

    def _image_list(self, x: Tensor):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"images must have shape (B, 3, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {x.dtype}")
        sizes = [tuple(im.shape[-2:]) for im in x]
        image_list, _ = self.transform(list(x))
        return image_list, sizes

    def head_outputs(self, out: DenseOutputs) -> dict[str, Tensor]:
        """Packed outputs -> torchvision's ``{"cls_logits": (B, N, K), "bbox_regression": (B, N, 4)}``."""
        return {"cls_logits": out.cls[0].squeeze(-1).transpose(1, 2),
                "bbox_regression": out.box[0].squeeze(-1).transpose(1, 2)}

    @torch.no_grad()
    def detect(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image as torchvision's RetinaNet gives them (boxes in ``x``'s pixels, scores, labels)."""
        image_list, sizes = self._image_list(x)
        env = self.run({"image": image_list.tensors})
        features = [env[n] for n in self.levels]
        anchors = self.anchor_generator(image_list, features)
        per_level = [p.shape[-2] * p.shape[-1] * self.num_anchors for p in features]
        head = {k: list(v.split(per_level, dim=1)) for k, v in self.head_outputs(self.collect(env)).items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        dets = RetinaNet.postprocess_detections(self, head, split_anchors, image_list.image_sizes)
        return self.transform.postprocess(dets, image_list.image_sizes, sizes)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_anchors={self.num_anchors}, units={len(self.units)}"
