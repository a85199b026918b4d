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

from .checkpoint import save_checkpoint
from .data import ShapesDataset
from .evaluate import evaluate_model
from .model import STRIDES, DenseOutputs, Detector, DetectorConfig, distances_to_boxes, flatten_levels, make_anchors
from .utils import atomic_write_json

__all__ = ["LossConfig", "TrainConfig", "detection_loss", "assign", "train", "ModelEMA"]


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
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        q = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * q)))

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
