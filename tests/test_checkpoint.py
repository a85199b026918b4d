"""detptq_mini.checkpoint: FP and quantized checkpoints, their format version, and atomic writes."""

import json
import re

import pytest
import torch
from torch import nn

from detptq_mini.checkpoint import (FORMAT_VERSION, READ_FORMATS, WEIGHTS_DIR, checkpoint_header, check_state_dict,
                                    load_any, load_checkpoint, load_pretrained, load_quantized, read_checkpoint,
                                    save_checkpoint, save_quantized)
from detptq_mini.data import ShapesDataset
from detptq_mini.model import Detector
from detptq_mini.pipeline import run_ptq
from detptq_mini.quant import QuantConv2d, head_convs
from detptq_mini.train import TrainConfig, train


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Detector().eval()


@pytest.fixture(scope="module")
def w8a8(pretrained):
    """A quick minmax W8A8 run on 4 calibration images."""
    return run_ptq(pretrained, ShapesDataset("calib", 4, seed=0), "minmax", 8, 8)


def _outputs(m, x):
    with torch.no_grad():
        out = m(x)
    return out.cls + out.box


def test_fp_round_trip_and_header(tmp_path, model):
    p = tmp_path / "m.pt"
    save_checkpoint(model, p, {"note": "x"})
    raw = torch.load(p, weights_only=True)
    assert raw["header"] == {"format": FORMAT_VERSION, "kind": "fp", "model": "yolo"} and FORMAT_VERSION in READ_FORMATS
    assert raw["meta"] == {"note": "x"}
    again = load_checkpoint(p)
    x = torch.rand(1, 3, 128, 128)
    assert not again.training
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(again, x)))
    loaded = load_any(p)
    assert loaded.kind == "fp" and loaded.report == {"note": "x"}
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(loaded.model, x)))
    with pytest.raises(ValueError, match="is not a quantized detptq-mini checkpoint"):
        load_quantized(p)


def test_quantized_round_trip_and_header(tmp_path, pretrained, w8a8):
    p = tmp_path / "q.pt"
    save_quantized(w8a8, p, dict(pretrained.config.__dict__))
    raw = torch.load(p, weights_only=True)
    assert raw["header"] == {"format": FORMAT_VERSION, "kind": "quantized", "model": "yolo"}
    q2, report = load_quantized(p)
    x = ShapesDataset("val", 2, seed=0).images()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(w8a8.model, x), _outputs(q2, x)))
    assert report["chosen_p"] == w8a8.report["chosen_p"] and report["method"] == "minmax"
    loaded = load_any(p)
    assert loaded.kind == "quantized" and loaded.report == report
    assert all(torch.equal(a, b) for a, b in zip(_outputs(w8a8.model, x), _outputs(loaded.model, x)))
    with pytest.raises(ValueError, match="holds a quantized model; load it with detptq_mini.checkpoint.load_quantized"):
        load_checkpoint(p)


def test_lp_w4a4_round_trip_keeps_the_chosen_p(tmp_path, pretrained):
    calib = ShapesDataset("calib", 8, seed=0)
    res = run_ptq(pretrained, calib, "lp", 4, 4, p=2.0, max_elements=2**12)
    path = tmp_path / "q.pt"
    save_quantized(res, path, dict(pretrained.config.__dict__))
    q2, report = load_quantized(path)
    x = calib.images(0, 2)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(res.model, x), _outputs(q2, x)))
    assert report["chosen_p"] == res.report["chosen_p"]


def test_head_fp_round_trip_and_a_checkpoint_without_protocol_loads_as_ours(tmp_path, pretrained, w8a8):
    res = run_ptq(pretrained, ShapesDataset("calib", 2, seed=0), "minmax", 4, 4, protocol="head-fp")
    path = tmp_path / "head_fp.pt"
    save_quantized(res, path, dict(pretrained.config.__dict__))
    assert torch.load(path, weights_only=True)["quant"]["quant_config"]["protocol"] == "head-fp"
    q2, report = load_quantized(path)
    assert report["quant_config"]["protocol"] == "head-fp"
    assert [(n, type(m)) for n, m in q2.named_modules()] == [(n, type(m)) for n, m in res.model.named_modules()]
    assert all(type(q2.get_submodule(n)) is nn.Conv2d for n in head_convs(pretrained))  # the head stays FP
    x = ShapesDataset("val", 2, seed=0).images()
    assert all(torch.equal(a, b) for a, b in zip(_outputs(res.model, x), _outputs(q2, x)))

    # a checkpoint written before the protocol existed has no "protocol" in its quantization config: "ours"
    raw = torch.load(_saved(tmp_path, pretrained, w8a8), weights_only=True)
    for holder in (raw["quant"], raw["report"]):  # (the two may be one dict, shared in the pickle)
        holder["quant_config"].pop("protocol", None)
    assert "protocol" not in raw["quant"]["quant_config"]
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    q3, _ = load_quantized(old)
    assert all(isinstance(q3.get_submodule(n), QuantConv2d) for n in head_convs(pretrained))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(w8a8.model, x), _outputs(q3, x)))


def _saved(tmp_path, pretrained, result) -> str:
    path = tmp_path / "saved.pt"
    save_quantized(result, path, dict(pretrained.config.__dict__))
    return path


def test_train_writes_a_versioned_checkpoint(tmp_path):
    cfg = TrainConfig(train_size=4, val_size=2, epochs=1, batch_size=4, warmup_steps=1)  # one step
    model, _ = train(cfg, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector.json", "detector.pt"]
    ckpt = read_checkpoint(tmp_path / "detector.pt")
    assert ckpt["header"] == {"format": FORMAT_VERSION, "kind": "fp", "model": "yolo"}
    assert json.loads(json.dumps(ckpt["meta"])) == json.loads((tmp_path / "detector.json").read_text())
    x = torch.rand(1, 3, 64, 64)
    again = load_checkpoint(tmp_path / "detector.pt")
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(again, x)))


def test_the_shipped_weights_carry_the_format_version():
    ckpt = read_checkpoint(WEIGHTS_DIR / "detector.pt")
    assert ckpt["header"] == {"format": FORMAT_VERSION, "kind": "fp"}
    assert ckpt["meta"]["command"] == "detptq-mini train"
    assert not load_pretrained().training


@pytest.mark.parametrize("header, found", [
    (None, "format version none (written before checkpoints had a format version);"),
    ({"kind": "fp"}, "format version none"),
    ({"format": 0, "kind": "fp"}, "format version 0;"),
    ({"format": 99, "kind": "fp"}, "format version 99;"),
    ({"format": "1", "kind": "fp"}, "format version '1';"),
    ({"format": True, "kind": "fp"}, "format version True;"),
])
@pytest.mark.parametrize("kind", ["fp", "quantized"])
def test_missing_old_or_unknown_version_is_refused(tmp_path, model, pretrained, w8a8, header, found, kind):
    good = tmp_path / "good.pt"
    if kind == "fp":
        save_checkpoint(model, good)
    else:
        save_quantized(w8a8, good, dict(pretrained.config.__dict__))
    ckpt = torch.load(good, weights_only=True)
    if header is None:
        del ckpt["header"]
    else:
        ckpt["header"] = header
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    message = re.escape(f"checkpoint '{bad}' has {found}") + ".*" + re.escape(
        "this release of detptq-mini reads format version(s) 1; re-create it: `detptq-mini train --out-dir DIR` for an "
        "FP model, `detptq-mini quantize ... --out PATH` for a quantized one")
    for load in (load_checkpoint, load_quantized, load_any, read_checkpoint):
        with pytest.raises(ValueError, match=message):
            load(bad)


def test_header_keys_a_reader_does_not_know_are_ignored(tmp_path, model):
    """Later releases may add e.g. the model name to the header without a new format version."""
    save_checkpoint(model, tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["header"]["model"] = "yolo"
    torch.save(ckpt, tmp_path / "m.pt")
    x = torch.rand(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), _outputs(load_checkpoint(tmp_path / "m.pt"), x)))


def test_unknown_kind_is_refused(tmp_path, model):
    save_checkpoint(model, tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    ckpt["header"]["kind"] = "int8"
    torch.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="has kind='int8' in its header; allowed: 'fp', 'quantized'"):
        load_any(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="kind='int8' is not a checkpoint kind"):
        checkpoint_header("int8")


def test_bad_files_are_refused(tmp_path, model):
    bad = tmp_path / "bad.pt"
    state = model.state_dict()
    state["head.p3.cls.pred.weight"] = torch.zeros(7, 48, 1, 1)
    torch.save({"header": checkpoint_header("fp"), "state_dict": state, "config": {"num_classes": 4}}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a detptq-mini checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="missing"):
        check_state_dict(model, {})


def test_writes_are_atomic(tmp_path, model, pretrained, w8a8, monkeypatch):
    # into a missing directory: the error names the argument, nothing is written
    with pytest.raises(ValueError, match=r"path='.*no_dir/m.pt': directory '.*no_dir' does not exist"):
        save_checkpoint(model, tmp_path / "no_dir" / "m.pt")
    with pytest.raises(ValueError, match=r"out='.*missing/q.pt': directory '.*missing' does not exist"):
        save_quantized(w8a8, tmp_path / "missing" / "q.pt", {})
    assert list(tmp_path.iterdir()) == []
    # a save that fails half-way leaves the file that was there untouched and no temporary file
    fp, q = tmp_path / "m.pt", tmp_path / "q.pt"
    save_checkpoint(model, fp)
    save_quantized(w8a8, q, dict(pretrained.config.__dict__))
    before = {p: p.read_bytes() for p in (fp, q)}

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, fp)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(w8a8, q, dict(pretrained.config.__dict__))
    assert sorted(tmp_path.iterdir()) == sorted(before) and all(p.read_bytes() == b for p, b in before.items())
