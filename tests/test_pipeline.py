import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from detptq_mini.data import ShapesDataset
from detptq_mini.lp import P_DEFAULT, apply_scales, lp_scale_search, search_model_scales
from detptq_mini.pipeline import METHODS, PTQConfig, run_ptq
from detptq_mini.quant import QuantConfig, QuantConv2d, head_convs, quant_layers, quantize_model


@pytest.fixture(scope="module")
def calib():
    return ShapesDataset("calib", 8, seed=0)


def test_input_model_is_never_modified_and_report_is_complete(pretrained, calib):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    res = run_ptq(pretrained, calib, "lp", 4, 8, p=2.5, max_elements=2**14)
    after = pretrained.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    r = res.report
    assert {"method", "w_bits", "a_bits", "config", "chosen_p", "seconds", "quant_config"} <= set(r)
    assert r["method"] == "lp" and r["w_bits"] == 4 and r["a_bits"] == 8 and r["config"]["p"] == 2.5
    assert set(r["chosen_p"].values()) == {2.5} and len(r["chosen_p"]) == 63
    # the conventions: stem and prediction convs at W8A8, the rest at W4A8
    assert r["layers"]["backbone.stem.conv"] == {"w_bits": 8, "a_bits": 8}
    assert r["layers"]["head.p4.box.pred"] == {"w_bits": 8, "a_bits": 8}
    assert r["layers"]["neck.bu4.cv1.conv"] == {"w_bits": 4, "a_bits": 8}
    assert res.model is not pretrained


def test_lp_run_uses_the_searched_scales(pretrained, calib):
    res = run_ptq(pretrained, calib, "lp", 4, 4, p=3.0, max_elements=2**14)
    layer = quant_layers(res.model)["backbone.c2f2.cv1.conv"]
    want, _ = lp_scale_search(layer.conv.weight.detach(), 4, (3.0,), axis=0, symmetric=True)[3.0]
    assert torch.equal(layer.weight_quantizer.scale, want)


def test_search_model_scales_serves_every_p(pretrained, calib):
    q = quantize_model(pretrained, QuantConfig(w_bits=4, a_bits=4))
    names = list(quant_layers(q))[:3]
    scales = search_model_scales(q, calib.images(), layers=names, max_elements=2**12)
    assert list(scales) == names and set(scales[names[0]].weight) == set(P_DEFAULT)
    apply_scales(q, scales, {n: 1.0 for n in names}, act_p=4.5)
    layer = quant_layers(q)[names[1]]
    assert torch.equal(layer.weight_quantizer.scale, scales[names[1]].weight[1.0][0])
    assert torch.equal(layer.input_quantizer.scale, scales[names[1]].act[4.5][0])
    # a small p clips more than a large one (a smaller activation scale)
    assert scales[names[1]].act[1.0][0] <= scales[names[1]].act[4.5][0]
    with pytest.raises(ValueError, match="not searched"):
        apply_scales(q, scales, 2.2)


def test_minmax_w8a8_is_close_to_fp(pretrained, calib):
    res = run_ptq(pretrained, calib, "minmax", 8, 8)
    x = calib.images(0, 4)
    with torch.no_grad():
        fp, q = pretrained(x), res.model(x)
    err = (torch.sigmoid(fp.cls[0]) - torch.sigmoid(q.cls[0])).abs().max()
    assert 0 < err < 0.1


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="nope"), "method"),
    (dict(method="lp", w_bits=9), "w_bits"),
    (dict(method="lp", a_bits=1), "a_bits"),
    (dict(method="lp", p=0.0), "p="),
    (dict(method="lp", p=float("nan")), "p="),
    (dict(method="minmax", p=2.0), "p="),
    (dict(method="lp", grid=0), "grid"),
    (dict(method="lp", protocol="head_fp"), "protocol='head_fp' is not allowed; allowed: 'ours', 'head-fp'"),
    (dict(method="lp", protocol=None), "protocol=None is not allowed"),
])
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PTQConfig(**kwargs)


def test_run_ptq_head_fp_leaves_the_head_convs_fp(pretrained, calib):
    images = calib.images(0, 2)
    head = head_convs(pretrained)
    res = run_ptq(pretrained, images, "minmax", 4, 4, protocol="head-fp")
    r = res.report
    assert r["config"]["protocol"] == "head-fp" and r["quant_config"]["protocol"] == "head-fp"
    assert all(type(res.model.get_submodule(n)) is nn.Conv2d for n in head) and len(head) == 18
    assert list(r["layers"]) == list(quant_layers(res.model)) and not set(head) & set(r["layers"])
    assert len(r["layers"]) == 45 and r["layers"]["backbone.stem.conv"] == {"w_bits": 8, "a_bits": 8}
    ours = run_ptq(pretrained, images, "minmax", 4, 4)
    assert ours.report["config"]["protocol"] == "ours" == ours.report["quant_config"]["protocol"]
    assert all(isinstance(ours.model.get_submodule(n), QuantConv2d) for n in head)
    # reconstruction (every method iterates over the quantized layers) skips the FP head units
    rec = run_ptq(pretrained, images, "qdrop", 4, 4, protocol="head-fp", grid=4, max_elements=2**10, iters=1,
                  recon_batch_size=2)
    assert set(rec.history.units) == set(pretrained.unit_names) - set(pretrained.head_units())
    assert all(type(rec.model.get_submodule(n)) is nn.Conv2d for n in head)


def test_bad_calibration_input(pretrained):
    with pytest.raises(ValueError, match="empty"):
        run_ptq(pretrained, torch.zeros(0, 3, 128, 128), "minmax", 4, 4)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        run_ptq(pretrained, torch.zeros(2, 1, 128, 128), "minmax", 4, 4)
    with pytest.raises(ValueError, match="float"):
        run_ptq(pretrained, torch.zeros(2, 3, 128, 128, dtype=torch.uint8), "minmax", 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        run_ptq(pretrained, torch.full((2, 3, 128, 128), float("nan")), "minmax", 4, 4)
    with pytest.raises(ValueError, match="unknown option"):
        run_ptq(pretrained, torch.zeros(2, 3, 128, 128), "minmax", 4, 4, colour="red")
    assert METHODS == ("minmax", "lp", "detptq", "brecq", "joint", "qdrop", "detptq-qdrop")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "detptq_mini.cli", *args], capture_output=True, text=True, timeout=900)


def test_cli_quantize_json_and_checkpoint(tmp_path):
    out = tmp_path / "q.pt"
    r = _cli("quantize", "--method", "minmax", "--w-bits", "8", "--a-bits", "8", "--calib", "8", "--val", "50",
             "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {"method", "w_bits", "a_bits", "map", "map50", "fp_map", "seconds"} <= set(res)
    assert res["method"] == "minmax" and abs(res["map"] - res["fp_map"]) < 0.03  # W8A8 barely moves mAP
    ev = _cli("evaluate", "--checkpoint", str(out), "--val", "50", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["map"] == pytest.approx(res["map"], abs=1e-12)


@pytest.mark.parametrize("args, word", [
    (["--method", "magic", "--w-bits", "4", "--a-bits", "4"], "--method"),
    (["--method", "lp", "--w-bits", "9", "--a-bits", "4"], "w_bits"),
    (["--method", "lp", "--w-bits", "4", "--a-bits", "4", "--p", "-1"], "p="),
    (["--method", "minmax", "--w-bits", "4", "--a-bits", "4", "--p", "2"], "p="),
    (["--method", "minmax", "--w-bits", "4", "--a-bits", "4", "--out", "/nonexistent/dir/q.pt"], "--out"),
    (["--method", "minmax", "--w-bits", "4", "--a-bits", "4", "--calib", "0"], "must be > 0"),
])
def test_cli_quantize_bad_input(args, word):
    r = _cli("quantize", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], r.stderr


def test_run_ptq_accepts_any_data_set_with_images_as_select_p_does(pretrained, calib):
    """A calibration set is anything with ``.images()`` (what select_p accepts), not only a ShapesDataset."""

    class MyImages:  # not a ShapesDataset: only the .images() a calibration set needs
        def images(self):
            return calib.images()

    a = run_ptq(pretrained, MyImages(), "minmax", 8, 8)
    b = run_ptq(pretrained, calib.images(), "minmax", 8, 8)
    assert a.report["calib_images"] == b.report["calib_images"] == len(calib)
    for (na, ta), (nb, tb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
