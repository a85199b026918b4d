import torch

from detptq_mini.data import ShapesDataset
from detptq_mini.model import Detector, make_anchors
from detptq_mini.train import LossConfig, ModelEMA, assign, detection_loss


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    ds = ShapesDataset("train", 16, seed=0)
    x, targets = ds.images(), [ds[i][1] for i in range(len(ds))]
    model = Detector().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = detection_loss(model(x), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_assigner_gives_every_box_a_positive_and_soft_targets_in_range():
    ds = ShapesDataset("val", 8, seed=0)
    targets = [ds[i][1] for i in range(len(ds))]
    centres, strides = make_anchors([(16, 16), (8, 8), (4, 4)])
    b, a, k = len(targets), len(centres), 4
    from detptq_mini.train import _pad_targets

    gt_boxes, gt_labels, gt_valid = _pad_targets(targets, "cpu")
    scores = torch.full((b, a, k), 0.5)
    # predicted boxes: a 16 px box around every location centre
    pred = torch.cat([centres - 8, centres + 8], 1).expand(b, a, 4)
    t_boxes, t_scores, fg = assign(scores, pred, centres, strides, gt_boxes, gt_labels, gt_valid, LossConfig())
    assert t_scores.min() >= 0 and t_scores.max() <= 1
    for i, t in enumerate(targets):
        assigned = {tuple(bx.tolist()) for bx in t_boxes[i][fg[i]]}
        assert assigned == {tuple(bx.tolist()) for bx in t["boxes"]}  # every box, tiny ones too, gets a location
        labels = t_scores[i][fg[i]].argmax(-1)
        assert set(labels.tolist()) <= set(t["labels"].tolist())


def test_loss_with_an_image_without_objects_is_finite():
    model = Detector().train()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out = detection_loss(model(torch.rand(2, 3, 128, 128)), targets)
    assert torch.isfinite(out["loss"]) and out["box"] == 0


def test_ema_tracks_the_model():
    m = torch.nn.Linear(2, 2)
    ema = ModelEMA(m, decay=0.5, tau=1e-9)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = ema.ema.weight.clone()
    ema.update(m)
    assert torch.allclose(ema.ema.weight, 0.5 * before + 0.5 * m.weight)
