"""Task losses for studying quantization: the labelled L_perf (and, with the ODOL issue, ODOL).

``l_perf`` measures what quantization costs the *task*: the detector's own
training loss (:func:`detptq_mini.train.detection_loss`) against ground-truth
labels on a labelled split, and ``1 - mAP`` for figures. It needs labels, so it
is used only to *study* label-free proxies, never to quantize (METHOD.md s. 4).
"""

from __future__ import annotations

import torch
from torch import nn

from .data import ShapesDataset
from .train import detection_loss

__all__ = ["l_perf", "l_perf_map"]


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
