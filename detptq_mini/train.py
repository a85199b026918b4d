"""The detection loss and the FP training loop that made the shipped weights.

Assigner: the task-aligned assigner of TOOD / YOLOv8 {Feng et al. 2021}. For
each ground-truth box, the candidate locations are those whose centre lies
inside the box (plus, so that no tiny object goes unassigned, the stride-8
location nearest to its centre). Each candidate gets the alignment metric
``t = p_c^alpha * IoU^beta`` (``p_c`` the predicted probability of the box's
class, IoU between the predicted and the true box); the ``topk`` best
candidates become positives; a location claimed by several boxes keeps the
one it overlaps most. Class targets are soft: ``t`` rescaled so that each
box's best location gets its best IoU (the classifier learns localisation
quality, which mAP at high IoU rewards).

Loss = ``cls_weight * BCE(cls logits, soft targets) + box_weight * (1 - CIoU)``
weighted by the targets, both normalised by the sum of the targets.

Training: AdamW, linear warm-up then cosine decay, horizontal/vertical flips,
an exponential moving average (EMA) of the weights, which is what ships.
One command reproduces the shipped weights: ``detptq-mini train``.

**The paper's detector** (``detptq-mini train --model retinanet-r18``, :func:`train_retinanet`): torchvision's
RetinaNet-ResNet18-FPN (:func:`detptq_mini.adapter.build_retinanet_r18`) from scratch on the same shapes, with
torchvision's own RetinaNet losses (sigmoid focal loss on the classes, L1 on the box deltas, anchors matched at IoU
>= 0.5, background below 0.4), the same flips, AdamW with warm-up and cosine decay, and an EMA of the weights, which
is what ships (BN frozen, in float16: :func:`detptq_mini.checkpoint.ship_float16`). It writes its full state
(weights, EMA, optimizer, random generators, history) atomically after every epoch, and ``resume=True`` continues
from it, giving the same weights as an uninterrupted run. :func:`anchor_recall` measures, before training, how many
training boxes the anchors can match.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, complete_box_iou_loss

from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from .adapter import RetinaNetAdapter, RetinaNetConfig, build_retinanet_r18, retinanet_r18_detector
from .checkpoint import save_checkpoint, ship_float16
from .checks import check_int
from .data import ShapesDataset
from .evaluate import evaluate_model
from .model import STRIDES, DenseOutputs, Detector, DetectorConfig, distances_to_boxes, flatten_levels, make_anchors
from .utils import atomic_torch_save, atomic_write_json

__all__ = ["LossConfig", "TrainConfig", "detection_loss", "assign", "train", "ModelEMA", "cosine_lr",
           "RetinaTrainConfig", "train_retinanet", "read_train_state", "anchor_recall", "retina_anchors",
           "RETINA_STATE", "RETINA_FP32"]


@dataclass(frozen=True)
class LossConfig:
    """Constants of the detection loss and its task-aligned assigner."""

    topk: int = 10
    alpha: float = 0.5
    beta: float = 6.0
    cls_weight: float = 1.0
    box_weight: float = 5.0


def _pad_targets(targets: list[dict[str, Tensor]], device) -> tuple[Tensor, Tensor, Tensor]:
    """Targets -> boxes ``(B, G, 4)``, labels ``(B, G)`` and a validity mask ``(B, G)``, padded to the max G."""
    g = max([len(t["labels"]) for t in targets] + [1])
    b = len(targets)
    boxes = torch.zeros(b, g, 4, device=device)
    labels = torch.zeros(b, g, dtype=torch.long, device=device)
    valid = torch.zeros(b, g, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n] = t["boxes"].to(device)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
    return boxes, labels, valid


@torch.no_grad()
def assign(scores: Tensor, pred_boxes: Tensor, centres: Tensor, strides: Tensor, gt_boxes: Tensor,
           gt_labels: Tensor, gt_valid: Tensor, cfg: LossConfig = LossConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """Task-aligned assignment.

    Args:
        scores: predicted class probabilities ``(B, A, K)``.
        pred_boxes: predicted xyxy boxes ``(B, A, 4)``.
        centres, strides: location centres ``(A, 2)`` and strides ``(A,)``.
        gt_boxes, gt_labels, gt_valid: padded targets ``(B, G, 4)``, ``(B, G)``, ``(B, G)``.

    Returns:
        target boxes ``(B, A, 4)``, soft class targets ``(B, A, K)``, foreground mask ``(B, A)``.
    """
    b, a, k = scores.shape
    g = gt_boxes.shape[1]
    cx, cy = centres[:, 0], centres[:, 1]
    inside = ((cx[None, None] > gt_boxes[..., 0:1]) & (cx[None, None] < gt_boxes[..., 2:3])
              & (cy[None, None] > gt_boxes[..., 1:2]) & (cy[None, None] < gt_boxes[..., 3:4]))  # (B, G, A)
    # the finest-level location nearest to each box centre is always a candidate
    fine = strides == STRIDES[0]
    gc = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, G, 2)
    d2 = ((gc[:, :, None, :] - centres[None, None]) ** 2).sum(-1).masked_fill(~fine, float("inf"))
    inside.scatter_(2, d2.argmin(-1, keepdim=True), True)
    inside &= gt_valid[..., None]

    iou = torch.stack([box_iou(gt_boxes[i], pred_boxes[i]) for i in range(b)]).clamp_(0)  # (B, G, A)
    cls_score = scores.gather(2, gt_labels[:, None, :].expand(b, a, g)).transpose(1, 2)  # (B, G, A)
    align = cls_score.pow(cfg.alpha) * iou.pow(cfg.beta) * inside
    topk = align.topk(min(cfg.topk, a), dim=-1).indices
    pos = torch.zeros_like(inside).scatter_(2, topk, True) & inside  # (B, G, A)
    # a location claimed by several boxes keeps the one with the highest IoU
    multi = pos.sum(1) > 1  # (B, A)
    if multi.any():
        best = iou.masked_fill(~inside, -1).argmax(1)  # (B, A)
        one = F.one_hot(best, g).transpose(1, 2).bool()
        pos = torch.where(multi[:, None, :], one & inside, pos)
    fg = pos.any(1)  # (B, A)
    gt_idx = pos.float().argmax(1)  # (B, A)
    t_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(b, a, 4))
    t_labels = gt_labels.gather(1, gt_idx)
    align = align * pos
    norm = align.amax(-1, keepdim=True).clamp_min(1e-9)
    best_iou = (iou * pos).amax(-1, keepdim=True)
    quality = (align / norm * best_iou).amax(1)  # (B, A)
    t_scores = F.one_hot(t_labels, k).float() * (quality * fg)[..., None]
    return t_boxes, t_scores, fg


def detection_loss(out: DenseOutputs, targets: list[dict[str, Tensor]], cfg: LossConfig = LossConfig()) -> dict[str, Tensor]:
    """The detector's training loss against ground truth (also the labelled L_perf of the book).

    Returns a dict with ``"loss"`` (scalar, differentiable), ``"cls"`` and ``"box"`` (detached parts).
    """
    logits, dist = flatten_levels(out)
    centres, strides = make_anchors([tuple(c.shape[-2:]) for c in out.cls], device=logits.device)
    pred_boxes = distances_to_boxes(dist, centres, strides)
    gt_boxes, gt_labels, gt_valid = _pad_targets(targets, logits.device)
    t_boxes, t_scores, fg = assign(logits.detach().sigmoid(), pred_boxes.detach(), centres, strides,
                                   gt_boxes, gt_labels, gt_valid, cfg)
    norm = t_scores.sum().clamp_min(1.0)
    loss_cls = F.binary_cross_entropy_with_logits(logits, t_scores, reduction="sum") / norm
    if fg.any():
        w = t_scores.sum(-1)[fg]
        loss_box = (complete_box_iou_loss(pred_boxes[fg], t_boxes[fg], reduction="none") * w).sum() / norm
    else:
        loss_box = pred_boxes.sum() * 0.0
    loss = cfg.cls_weight * loss_cls + cfg.box_weight * loss_box
    return {"loss": loss, "cls": loss_cls.detach(), "box": loss_box.detach()}


class ModelEMA:
    """Exponential moving average of a model's weights and buffers, decay ramping up as in YOLOv5/v8."""

    def __init__(self, model: nn.Module, decay: float = 0.9995, tau: float = 500.0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the shipped weights (with the seed, the run is reproducible)."""

    train_size: int = 8000
    val_size: int = 500
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 200
    seed: int = 0
    model: DetectorConfig = DetectorConfig()
    loss: LossConfig = LossConfig()


def cosine_lr(step: int, lr: float, warmup_steps: int, total: int) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup_steps``, then cosine decay to 2 % of ``lr`` at
    ``total`` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    q = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q)))


def _flip(images: Tensor, targets: list[dict], gen: torch.Generator) -> tuple[Tensor, list[dict]]:
    """Random horizontal and vertical flips, per image, with their boxes."""
    images = images.clone()
    w, h = images.shape[-1], images.shape[-2]
    out = []
    for i, t in enumerate(targets):
        boxes = t["boxes"].clone()
        hf, vf = torch.rand(2, generator=gen).lt(0.5).tolist()
        if hf:
            images[i] = images[i].flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        if vf:
            images[i] = images[i].flip(-2)
            boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
        out.append({"boxes": boxes, "labels": t["labels"]})
    return images, out


def train(cfg: TrainConfig = TrainConfig(), device: str | torch.device = "cpu", progress: bool = False,
          out_dir: str | os.PathLike | None = None) -> tuple[Detector, dict]:
    """Train the FP detector from scratch; returns the EMA model (eval mode) and a history dict.

    With ``out_dir`` the EMA weights and their metadata (config, seed, val mAP) are written there as
    ``detector.pt`` (:func:`detptq_mini.checkpoint.save_checkpoint`) and ``detector.json``, atomically.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    data = ShapesDataset("train", cfg.train_size, seed=cfg.seed)
    model = Detector(cfg.model).to(device)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(data) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        return cosine_lr(step, cfg.lr, cfg.warmup_steps, total)

    ema = ModelEMA(model)
    history: dict[str, list] = {"step": [], "loss": [], "cls": [], "box": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="train", unit="step")
    step = 0
    model.train()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            images = data.images_u8[idx].float().div_(255.0)
            targets = [data.targets[i] for i in idx.tolist()]
            images, targets = _flip(images, targets, gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            losses = detection_loss(model(images.to(device)), targets, cfg.loss)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update(model)
            if step % 10 == 0:
                history["step"].append(step)
                for k in ("loss", "cls", "box"):
                    history[k].append(float(losses[k].detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
            step += 1
    if bar is not None:
        bar.close()
    final = ema.ema.eval()
    metrics = evaluate_model(final, ShapesDataset("val", cfg.val_size, seed=0), device=device)
    history["val"] = metrics
    history["seconds"] = time.time() - t0
    if out_dir is not None:
        meta = {"train_config": asdict(cfg), "seed": cfg.seed, "val_map": metrics["map"], "val_map50": metrics["map50"],
                "val_split": {"split": "val", "size": cfg.val_size, "seed": 0}, "train_seconds": round(history["seconds"]),
                "torch": str(torch.__version__), "command": "detptq-mini train"}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(final, out_dir / "detector.pt", meta)
        atomic_write_json(out_dir / "detector.json", meta)
    return final, history


# ------------------------------------------------------------------ RetinaNet-ResNet18-FPN (--model retinanet-r18)
#: The file of the training state after the last finished epoch (what a resume reads), in :func:`train_retinanet`'s
#: ``state_dir``.
RETINA_STATE = "retinanet-r18.state.pt"
#: The file, in ``state_dir`` too, of the trained EMA model in float32 (before the float16 copy ships).
RETINA_FP32 = "retinanet-r18.fp32.pt"


@dataclass(frozen=True)
class RetinaTrainConfig:
    """Everything that determines the RetinaNet-ResNet18-FPN weights (with the seed, the run is reproducible).

    The plan of ``detptq-mini train --model retinanet-r18``: about 90 minutes with one torch thread on a free core,
    the other core left to the rest of the machine. Measured (20 steps of batch 16 after 2 warm-up steps, on this
    project's 2-core machine while one core ran a benchmark and another process shared the second, load average
    about 5): 6.3 s a step wall with 1 thread, of which 3.2 s of CPU time; 14.8 s with 2 threads (they wait on each
    other when the cores are shared). So a step costs about 3.2 s on a core of its own: 4,000 training images (the
    first 4,000 of the train split), batch 16, 250 steps an epoch, 7 epochs = 1,750 steps, about 93 minutes (plus
    about a minute to draw the images and three evaluations of the 500 val images). On 2 idle cores with 2 threads a
    step should take at most about 2x less (not measured: the machine was never idle); ``--epochs`` then scales the
    run. AdamW at ``lr`` = 2e-4 with 100 warm-up steps and cosine decay to 2 %: on a 50-step run, 1e-3 made the
    focal loss jump (1.13 to 7.8 at the end of the warm-up), 2e-4 brought the loss from 1.85 to 1.19; gradient norm
    clipped at 10; the EMA of the weights ships.
    """

    train_size: int = 4000
    val_size: int = 500
    epochs: int = 7
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    clip_norm: float = 10.0
    ema_decay: float = 0.999
    seed: int = 0
    model: RetinaNetConfig = RetinaNetConfig()

    def __post_init__(self):
        for name in ("train_size", "val_size", "epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.batch_size > self.train_size:
            raise ValueError(f"batch_size={self.batch_size} is more than train_size={self.train_size}; allowed: "
                             f"1..{self.train_size}")


def _feature_sizes(image_size: int, levels: int = 5) -> list[int]:
    """The side of P3..P7 for a square image: every stride-2 layer (ResNet's conv1, max-pool, layer2..4, P6, P7)
    rounds up."""
    side, out = image_size, []
    for k in range(2 + levels):
        side = -(-side // 2)
        if k >= 2:
            out.append(side)
    return out


def retina_anchors(config: RetinaNetConfig = RetinaNetConfig()) -> Tensor:
    """Every anchor of one ``config.image_size`` image as torchvision's ``AnchorGenerator`` makes it: ``(N, 4)`` xyxy
    pixels, levels P3..P7 in order (``N = 3069`` for 128 px and 9 anchors a location)."""
    gen = AnchorGenerator(config.anchor_sizes, (config.aspect_ratios,) * len(config.anchor_sizes))
    s = config.image_size
    images = ImageList(torch.zeros(1, 3, s, s), [(s, s)])
    feats = [torch.zeros(1, 1, f, f) for f in _feature_sizes(s, len(config.anchor_sizes))]
    return gen(images, feats)[0]


@torch.no_grad()
def anchor_recall(dataset: ShapesDataset, config: RetinaNetConfig = RetinaNetConfig(),
                  thresholds: tuple[float, ...] = (0.5, 0.4)) -> dict:
    """How many ground-truth boxes of ``dataset`` the anchors of ``config`` can match.

    A box is recalled at threshold t when some anchor overlaps it with IoU >= t: RetinaNet's matcher makes an anchor
    foreground at IoU >= 0.5 and background below 0.4 (a box with no anchor above 0.5 still gets its best anchor, a
    "low-quality" match, but a poor one).

    Returns:
        a dict: ``boxes`` (their number), ``recall`` (``{t: fraction}``), ``mean_best_iou`` (each box's best IoU,
        averaged) and ``by_size`` (``{bucket: {"boxes": n, "recall": {t: fraction}}}``, the buckets by the box's
        longer side in pixels: ``"<16"``, ``"16-32"``, ``">=32"``).
    """
    if not isinstance(dataset, ShapesDataset):
        raise ValueError(f"dataset must be a ShapesDataset, got {type(dataset).__name__}")
    anchors = retina_anchors(config)
    boxes = torch.cat([t["boxes"].float() for t in dataset.targets])
    best = torch.cat([box_iou(chunk, anchors).amax(1) for chunk in boxes.split(4096)])
    side = (boxes[:, 2:] - boxes[:, :2]).amax(1)
    buckets = {"<16": side < 16, "16-32": (side >= 16) & (side < 32), ">=32": side >= 32}

    def recall(mask: Tensor) -> dict:
        n = int(mask.sum())
        return {float(t): (float((best[mask] >= t).float().mean()) if n else 0.0) for t in thresholds}

    everything = torch.ones_like(best, dtype=torch.bool)
    return {"boxes": len(boxes), "recall": recall(everything), "mean_best_iou": float(best.mean()),
            "by_size": {k: {"boxes": int(m.sum()), "recall": recall(m)} for k, m in buckets.items()}}


def _retina_state(cfg, model, opt, ema, gen, epoch, step, history, seconds) -> dict:
    return {"train_config": asdict(cfg), "epoch": epoch, "step": step, "model": model.state_dict(),
            "ema": ema.ema.state_dict(), "ema_updates": ema.updates, "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(), "gen": gen.get_state(), "history": history, "seconds": seconds}


def train_retinanet(cfg: RetinaTrainConfig = RetinaTrainConfig(), device: str | torch.device = "cpu",
                    progress: bool = False, out_dir: str | os.PathLike | None = None,
                    state_dir: str | os.PathLike | None = None, resume: bool = False,
                    ship_val: int | None = None) -> tuple[RetinaNetAdapter, dict]:
    """Train RetinaNet-ResNet18-FPN from scratch on the shapes; returns the EMA model as a frozen-BN
    :class:`~detptq_mini.adapter.RetinaNetAdapter` (eval mode) and a history dict.

    Args:
        cfg: the run (:class:`RetinaTrainConfig`).
        device: where it trains.
        progress: a tqdm bar over the steps.
        out_dir: where the shipped float16 weights ``retinanet-r18.pt`` and ``retinanet-r18.json`` go
            (:func:`~detptq_mini.checkpoint.ship_float16`, after checking that their val mAP is the float32 model's
            within 0.001); None: not written.
        state_dir: where the training state (:data:`RETINA_STATE`, after every epoch) and the float32 model
            (:data:`RETINA_FP32`) go; None: not written (and no resume).
        resume: continue from ``state_dir``'s state (its config must be ``cfg``); a ValueError if there is none.
        ship_val: val images of the float16 check (default ``cfg.val_size``).

    The history holds the loss of every step (``step``, ``loss``, ``cls``, ``box``), the val mAP (``val``),
    ``seconds`` and ``threads`` (``torch.get_num_threads()``).
    """
    if not isinstance(cfg, RetinaTrainConfig):
        raise ValueError(f"cfg must be a RetinaTrainConfig, got {type(cfg).__name__}")
    state_path = Path(state_dir) / RETINA_STATE if state_dir is not None else None
    if resume and (state_path is None or not state_path.is_file()):
        raise ValueError(f"resume=True needs a training state, and there is none at "
                         f"{str(state_path) if state_path else 'state_dir=None'}; start without --resume")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    data = ShapesDataset("train", cfg.train_size, seed=cfg.seed, image_size=cfg.model.image_size)
    model = build_retinanet_r18(cfg.model).to(device)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    ema = ModelEMA(model, decay=cfg.ema_decay)
    steps_per_epoch = len(data) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    history: dict[str, list] = {"step": [], "loss": [], "cls": [], "box": []}
    start_epoch, step, before = 0, 0, 0.0
    if resume:
        state = read_train_state(state_path)
        if state["train_config"] != asdict(cfg):
            raise ValueError(f"the training state {str(state_path)!r} is of another run (config "
                             f"{state['train_config']}); resume needs the same config, or start without --resume")
        model.load_state_dict(state["model"])
        ema.ema.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["gen"])
        start_epoch, step, history, before = state["epoch"], state["step"], state["history"], state["seconds"]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc="train retinanet-r18", unit="step")
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = torch.randperm(len(data), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            images = data.images_u8[idx].float().div_(255.0)
            targets = [data.targets[i] for i in idx.tolist()]
            images, targets = _flip(images, targets, gen)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
            losses = model(list(images.to(device)), [{k: v.to(device) for k, v in t.items()} for t in targets])
            loss = losses["classification"] + losses["bbox_regression"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            ema.update(model)
            history["step"].append(step)  # every step: a few thousand floats
            for k, v in (("loss", loss), ("cls", losses["classification"]), ("box", losses["bbox_regression"])):
                history[k].append(float(v.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epoch=epoch + 1)
            step += 1
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(_retina_state(cfg, model, opt, ema, gen, epoch + 1, step, history,
                                            before + time.time() - t0), state_path, "state_dir")
    if bar is not None:
        bar.close()
    final = retinanet_r18_detector(cfg.model, ema.ema.eval()).to(device)
    val = ShapesDataset("val", cfg.val_size, seed=0, image_size=cfg.model.image_size)
    metrics = evaluate_model(final, val, device=device)
    history["val"] = metrics
    history["seconds"] = before + time.time() - t0
    history["threads"] = torch.get_num_threads()
    meta = {"model": "retinanet-r18", "train_config": asdict(cfg), "seed": cfg.seed, "val_map": metrics["map"],
            "val_map50": metrics["map50"], "val_split": {"split": "val", "size": cfg.val_size, "seed": 0},
            "train_seconds": round(history["seconds"]), "threads": history["threads"], "torch": str(torch.__version__),
            "command": "detptq-mini train --model retinanet-r18"}
    if state_dir is not None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        save_checkpoint(final, Path(state_dir) / RETINA_FP32, meta)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        n = cfg.val_size if ship_val is None else ship_val
        check = ship_float16(final, out_dir / "retinanet-r18.pt", meta,
                             val if n == cfg.val_size else ShapesDataset("val", n, seed=0,
                                                                         image_size=cfg.model.image_size),
                             device=device)
        atomic_write_json(out_dir / "retinanet-r18.json", {**meta, "float16": check})
        history["float16"] = check
    return final, history


def read_train_state(path: str | os.PathLike) -> dict:
    """The training state :func:`train_retinanet` wrote after an epoch (a ValueError naming ``path`` if it is not
    one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"training state {str(path)!r} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not a training state"
        raise ValueError(f"{str(path)!r} is not a training state of train_retinanet ({type(e).__name__}: {e})") \
            from None
    keys = {"train_config", "epoch", "step", "model", "ema", "optimizer", "torch_rng", "gen", "history"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(f"{str(path)!r} is not a training state of train_retinanet (needs {sorted(keys)})")
    return state
