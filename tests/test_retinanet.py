"""RetinaNet-ResNet18-FPN (``--model retinanet-r18``): the builder, its anchors, training (resumable, float16
shipping), and its checkpoints, which name the model and refuse the other. Tiny images and a few steps: each test
takes seconds."""

import json

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detptq_mini import checkpoint as ckpt_mod
from detptq_mini import load_pretrained
from detptq_mini import train as train_mod
from detptq_mini.adapter import (DEFAULT_ANCHOR_SIZES, R18_ANCHOR_SIZES, RetinaNetAdapter, RetinaNetConfig,
                                 build_retinanet_r18, retinanet_r18_detector)
from detptq_mini.checkpoint import (MODELS, load_any, load_checkpoint, load_quantized, read_checkpoint,
                                    save_checkpoint, save_quantized, ship_float16)
from detptq_mini.data import ShapesDataset
from detptq_mini.pipeline import run_ptq
from detptq_mini.train import RETINA_FP32, RETINA_STATE, RetinaTrainConfig, anchor_recall, retina_anchors, train_retinanet

TINY = RetinaNetConfig(image_size=64)


def _tiny_cfg(**kw) -> RetinaTrainConfig:
    return RetinaTrainConfig(**{"train_size": 8, "val_size": 4, "epochs": 2, "batch_size": 4, "warmup_steps": 1,
                                "model": TINY, **kw})


def _outputs(m, x):
    with torch.no_grad():
        out = m(x)
    return out.cls + out.box


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two epochs of two steps on 64 px images, with the state, the float32 model and the shipped float16 files."""
    d = tmp_path_factory.mktemp("r18")
    model, hist = train_retinanet(_tiny_cfg(), state_dir=d / "state", out_dir=d / "out")
    return d, model, hist


def test_the_builder_trains_every_layer_with_batchnorm_and_our_anchors():
    m = build_retinanet_r18()
    assert 19.0e6 < sum(p.numel() for p in m.parameters()) < 19.5e6  # ResNet-18 + 256-channel FPN and head
    assert all(p.requires_grad for p in m.parameters())  # trainable_layers=5: the stem and layer1 too
    assert not any(isinstance(x, FrozenBatchNorm2d) for x in m.modules())
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 20
    assert m.transform.min_size == (128,) and m.transform.max_size == 128
    assert m.anchor_generator.sizes == R18_ANCHOR_SIZES and m.anchor_generator.num_anchors_per_location() == [9] * 5
    assert R18_ANCHOR_SIZES[0] == (12.0, 15.12, 19.05) and DEFAULT_ANCHOR_SIZES[0] == (32.0, 40.0, 50.0)
    det = retinanet_r18_detector()
    assert isinstance(det, RetinaNetAdapter) and det.config == RetinaNetConfig() and not det.training
    assert not any(isinstance(x, nn.BatchNorm2d) for x in det.modules())  # frozen, folded by quantization
    assert det(torch.rand(1, 3, 128, 128)).cls[0].shape == (1, 4, (16 * 16 + 8 * 8 + 16 + 4 + 1) * 9, 1)


@pytest.mark.parametrize("kw, word", [
    ({"anchor_sizes": ((8, 10),) * 4}, "anchor_sizes"),
    ({"anchor_sizes": ((8, -1, 12),) * 5}, "anchor_sizes"),
    ({"aspect_ratios": ()}, "aspect_ratios"),
    ({"num_classes": 0}, "num_classes"),
])
def test_bad_retinanet_config_names_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        RetinaNetConfig(**kw)


def test_anchor_recall_counts_the_boxes_an_anchor_matches():
    anchors = retina_anchors()
    assert anchors.shape == (3069, 4)
    data = ShapesDataset("train", 100, seed=0)
    ours, default = anchor_recall(data), anchor_recall(data, RetinaNetConfig(anchor_sizes=DEFAULT_ANCHOR_SIZES))
    n = sum(len(t["boxes"]) for t in data.targets)
    assert ours["boxes"] == default["boxes"] == n
    assert sum(b["boxes"] for b in ours["by_size"].values()) == n
    assert 0 <= ours["recall"][0.5] <= ours["recall"][0.4] <= 1
    assert ours["recall"][0.5] > default["recall"][0.5] + 0.2  # scaled to the objects, they match far more
    assert default["by_size"]["<16"]["recall"][0.5] == 0.0  # 32 px anchors miss every small box
    # a box that is an anchor is recalled whatever the threshold
    one = ShapesDataset("train", 1, seed=0)
    one.targets = [{"boxes": anchors[:1].clone(), "labels": torch.zeros(1, dtype=torch.long)}]
    assert anchor_recall(one, thresholds=(0.99,))["recall"] == {0.99: 1.0}


def test_a_few_steps_of_torchvisions_losses_lower_the_loss():
    torch.manual_seed(0)
    data = ShapesDataset("train", 8, seed=0, image_size=64)
    model = build_retinanet_r18(TINY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, targets = list(data.images()), [data[i][1] for i in range(len(data))]
    losses = []
    for _ in range(8):
        out = model(x, targets)
        loss = out["classification"] + out["bbox_regression"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]


def test_training_writes_its_state_the_float32_model_and_the_float16_weights(tiny_run):
    d, model, hist = tiny_run
    assert sorted(p.name for p in (d / "state").iterdir()) == sorted([RETINA_STATE, RETINA_FP32])
    assert sorted(p.name for p in (d / "out").iterdir()) == ["retinanet-r18.json", "retinanet-r18.pt"]
    assert hist["threads"] == torch.get_num_threads() and hist["step"] == [0, 1, 2, 3]
    raw = read_checkpoint(d / "out" / "retinanet-r18.pt")
    assert raw["header"] == {"format": 1, "kind": "fp", "model": "retinanet-r18", "dtype": "float16"}
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    assert read_checkpoint(d / "state" / RETINA_FP32)["header"]["model"] == "retinanet-r18"
    meta = json.loads((d / "out" / "retinanet-r18.json").read_text())
    assert meta["model"] == "retinanet-r18" and meta["float16"]["max_abs_diff"] <= 1e-3
    assert meta["command"] == "detptq-mini train --model retinanet-r18" and meta["threads"] == hist["threads"]
    half = load_checkpoint(d / "out" / "retinanet-r18.pt", model="retinanet-r18")
    assert isinstance(half, RetinaNetAdapter) and half.config == TINY
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(_outputs(model, x), _outputs(half, x)):
        assert torch.allclose(a, b, atol=0.05, rtol=0.01)  # float16 weights, float32 arithmetic


def test_resume_after_an_interruption_gives_the_same_weights(tiny_run, tmp_path, monkeypatch):
    _, straight, _ = tiny_run
    real = train_mod.atomic_torch_save

    def save_then_stop(obj, path, argument="path"):
        real(obj, path, argument)
        raise KeyboardInterrupt  # killed right after the first epoch's state is written

    monkeypatch.setattr(train_mod, "atomic_torch_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_retinanet(_tiny_cfg(), state_dir=tmp_path)
    monkeypatch.undo()
    assert torch.load(tmp_path / RETINA_STATE, weights_only=True)["epoch"] == 1
    resumed, hist = train_retinanet(_tiny_cfg(), state_dir=tmp_path, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another run"):
        train_retinanet(_tiny_cfg(epochs=3), state_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="start without --resume"):
        train_retinanet(_tiny_cfg(), state_dir=tmp_path / "none", resume=True)


def test_ship_float16_keeps_the_map_of_a_trained_model_and_refuses_a_change(pretrained, tmp_path, monkeypatch):
    val = ShapesDataset("val", 32, seed=0)
    check = ship_float16(pretrained, tmp_path / "half.pt", {"note": 1}, val)
    assert check["map_float32"] > 0.5 and abs(check["map_float16"] - check["map_float32"]) <= 1e-3
    assert check["max_abs_diff"] <= 1e-3 and check["val_images"] == 32
    raw = read_checkpoint(tmp_path / "half.pt")
    assert raw["header"]["dtype"] == "float16" and raw["meta"] == {"note": 1, "float16": check}
    half = load_checkpoint(tmp_path / "half.pt", model="yolo")
    assert all(v.dtype == torch.float32 for v in half.state_dict().values() if v.is_floating_point())
    full = tmp_path / "full.pt"
    save_checkpoint(pretrained, full)
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * full.stat().st_size
    maps = iter([{"map": 0.5, "map50": 0.9}, {"map": 0.49, "map50": 0.9}])
    monkeypatch.setattr(ckpt_mod, "evaluate_model", lambda *a, **k: next(maps))
    with pytest.raises(ValueError, match=r"change the FP mAP by 0\.01 > tol=0\.001"):
        ship_float16(pretrained, tmp_path / "no.pt", val=val)
    assert not (tmp_path / "no.pt").exists()


def test_checkpoints_name_their_model_and_refuse_the_other(tiny_run, pretrained, tmp_path):
    d, model, _ = tiny_run
    path = d / "state" / RETINA_FP32
    with pytest.raises(ValueError, match=r"holds model 'retinanet-r18', not 'yolo'.*--model retinanet-r18"):
        load_checkpoint(path, model="yolo")
    assert load_any(path).model.config == TINY  # no model asked: whatever the file holds
    yolo = tmp_path / "yolo.pt"
    save_checkpoint(pretrained, yolo)
    with pytest.raises(ValueError, match=r"holds model 'yolo', not 'retinanet-r18'"):
        load_any(yolo, model="retinanet-r18")
    with pytest.raises(ValueError, match=r"model='r50' is not allowed; allowed: 'yolo', 'retinanet-r18'"):
        load_checkpoint(yolo, model="r50")
    raw = torch.load(yolo, weights_only=True)
    raw["header"]["model"] = "r50"
    torch.save(raw, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"holds model='r50', which this release cannot build; allowed"):
        load_checkpoint(tmp_path / "odd.pt")
    # quantized: the model travels in the header too
    calib = ShapesDataset("calib", 2, seed=0, image_size=64)
    res = run_ptq(model, calib, "minmax", 8, 8)
    q = tmp_path / "q.pt"
    save_quantized(res, q, dict(model.config.__dict__), "retinanet-r18")
    qmodel, report = load_quantized(q, model="retinanet-r18")
    x = calib.images()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(res.model, x), _outputs(qmodel, x)))
    with pytest.raises(ValueError, match="not 'yolo'"):
        load_quantized(q, model="yolo")


def test_load_pretrained_names_the_models_and_says_how_to_make_missing_weights(tmp_path, monkeypatch):
    assert MODELS == ("yolo", "retinanet-r18")
    assert not load_pretrained().training and not load_pretrained("yolo").training  # the default is yolo
    with pytest.raises(ValueError, match=r"name='r50' is not allowed; allowed: 'yolo', 'retinanet-r18'"):
        load_pretrained("r50")
    with pytest.raises(ValueError, match=r"name='cpu' is not a model; allowed: .*device="):
        load_pretrained("cpu")
    monkeypatch.setattr(ckpt_mod, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'retinanet-r18' are not in this package .*make weights-retinanet"):
        load_pretrained("retinanet-r18")
    with pytest.raises(FileNotFoundError, match="make weights-retinanet"):
        ckpt_mod.pretrained_info("retinanet-r18")


def test_the_shipped_retinanet_weights_are_trained_float16_and_load_without_a_network():
    path = ckpt_mod.pretrained_path("retinanet-r18")
    assert path.exists(), "the package ships RetinaNet-R18's weights (make weights-retinanet)"
    assert path.stat().st_size < 45e6  # float16: about 39 MB
    header = read_checkpoint(path)["header"]
    assert header["model"] == "retinanet-r18" and header["dtype"] == "float16"
    info = ckpt_mod.pretrained_info("retinanet-r18")
    check = info["float16"]
    assert check["val_images"] == 500 and check["max_abs_diff"] <= check["tol"] == 1e-3
    assert info["val_map"] == check["map_float32"] and info["model"] == "retinanet-r18"
    model = load_pretrained("retinanet-r18")
    assert isinstance(model, RetinaNetAdapter) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float16 on disk, float32 to run
    from detptq_mini.evaluate import evaluate_model

    m = evaluate_model(model, ShapesDataset("val", 40, seed=0))  # trained, not random (random scores 0)
    assert m["map"] > 0.5 and abs(m["map"] - info["float16"]["map_float16"]) < 0.1
