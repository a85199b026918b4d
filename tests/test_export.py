"""detptq_mini.export: the W8A8 ONNX QDQ graph and its check in ONNX Runtime (CPU)."""

import pytest
import torch

from detptq_mini.data import ShapesDataset
from detptq_mini.evaluate import evaluate_model
from detptq_mini.export import (OUTPUT_NAMES, OnnxDetector, check_exportable, check_layers, compare_outputs,
                                export_onnx, latency_per_image, onnx_session, qdq_summary, to_float, to_qdq)
from detptq_mini.pipeline import run_ptq
from detptq_mini.quant import quant_layers


@pytest.fixture(scope="module")
def w8a8(pretrained):
    return run_ptq(pretrained, ShapesDataset("calib", 32, seed=0), "minmax", 8, 8).model


@pytest.fixture(scope="module")
def exported(w8a8, tmp_path_factory):
    return export_onnx(w8a8, tmp_path_factory.mktemp("onnx") / "q.onnx")


@pytest.mark.parametrize("dynamo", [False, True])
def test_export_copy_computes_the_fake_quant_model_bit_for_bit(w8a8, dynamo):
    x = ShapesDataset("val", 4).images()
    with torch.no_grad():
        a, b = w8a8(x), to_qdq(w8a8, dynamo)(x)
    assert all(torch.equal(u, v) for u, v in zip(a.cls + a.box, b.cls + b.box))
    assert all(m.weight_quantizer.enabled for m in quant_layers(w8a8).values())  # the original is untouched


@pytest.mark.parametrize("dynamo", [False, True])
def test_graph_has_qdq_around_every_conv_with_per_channel_weights(w8a8, tmp_path, dynamo):
    path = export_onnx(w8a8, tmp_path / "q.onnx", dynamo=dynamo)
    s = qdq_summary(path)
    n = len(quant_layers(w8a8))
    assert s["convs"] == n and s["qdq_convs"] == n and s["per_channel_weight_convs"] == n
    assert s["nodes"]["DequantizeLinear"] >= n  # one weight DQ per conv at least; inputs may share a pair
    assert s["opset"] >= 13
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temporary left
    x = ShapesDataset("val", 3).images()  # a dynamic batch, run by ONNX Runtime
    out = OnnxDetector(onnx_session(path))(x)
    with torch.no_grad():
        ref = w8a8(x)
    for r, o in zip(ref.cls + ref.box, out.cls + out.box):
        assert o.shape == r.shape and torch.isfinite(o).all()


def test_fp_graph_has_no_qdq(w8a8, tmp_path):
    s = qdq_summary(export_onnx(to_float(w8a8), tmp_path / "fp.onnx"))
    assert s["convs"] == len(quant_layers(w8a8)) and s["qdq_convs"] == 0 and "QuantizeLinear" not in s["nodes"]


def test_every_exported_conv_within_one_quantization_step(w8a8):
    r = check_layers(w8a8, ShapesDataset("val", 4).images())
    assert set(r["layers"]) == set(quant_layers(w8a8)) and r["within_step"], r["worst_layer"]


def test_onnx_runtime_map_within_0005_of_fake_quant(w8a8, exported):
    val = ShapesDataset("val", 200, seed=0)
    session = onnx_session(exported)
    m_fq = evaluate_model(w8a8, val)["map"]
    m_ort = evaluate_model(OnnxDetector(session), val)["map"]
    assert abs(m_ort - m_fq) <= 0.005, (m_ort, m_fq)
    cmp = compare_outputs(w8a8, session, val.images(0, 16))
    assert set(cmp) == set(OUTPUT_NAMES)
    for v in cmp.values():  # the drift is measured, finite, and its mean far below its maximum
        assert 0 <= v["mean_abs"] <= v["max_abs"] < float("inf") and v["step"] > 0


def test_fp32_graph_equals_torch(w8a8, tmp_path):
    fp = to_float(w8a8)
    session = onnx_session(export_onnx(fp, tmp_path / "fp.onnx"))
    x = ShapesDataset("val", 4).images()
    with torch.no_grad():
        ref = fp(x)
    got = OnnxDetector(session)(x)
    for r, o in zip(ref.cls + ref.box, got.cls + got.box):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_latency_is_measured(exported):
    r = latency_per_image(onnx_session(exported), warmup=1, repeats=3)
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 3


def test_not_exportable(pretrained, tmp_path):
    w4 = run_ptq(pretrained, ShapesDataset("calib", 4), "minmax", 4, 8).model
    with pytest.raises(ValueError, match="is W4A8; ONNX QDQ export supports W8A8 only"):
        export_onnx(w4, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="no QuantConv2d"):
        check_exportable(pretrained)
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(pretrained, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="opset=11 must be an integer >= 13"):
        export_onnx(pretrained, tmp_path / "q.onnx", opset=11)
    assert list(tmp_path.iterdir()) == []


def test_head_fp_exports_with_the_head_as_plain_fp_convs(pretrained, tmp_path):
    qmodel = run_ptq(pretrained, ShapesDataset("calib", 4), "minmax", 8, 8, protocol="head-fp").model
    n = len(quant_layers(qmodel))
    path = export_onnx(qmodel, tmp_path / "head_fp.onnx")
    s = qdq_summary(path)
    assert n == 45 and s["convs"] == 63 and s["qdq_convs"] == n == s["per_channel_weight_convs"]  # 18 FP head convs
    x = ShapesDataset("val", 2).images()
    session = onnx_session(path)
    with torch.no_grad():
        ref = qmodel(x)
    got = OnnxDetector(session)(x)
    for r, o in zip(ref.cls + ref.box, got.cls + got.box):
        assert o.shape == r.shape and torch.isfinite(o).all()
    cmp = compare_outputs(qmodel, session, x)  # the FP prediction convs have no quantization step
    assert set(cmp) == set(OUTPUT_NAMES)
    assert all(v["step"] is None and v["max_steps"] is None and 0 <= v["mean_abs"] <= v["max_abs"] < float("inf")
               for v in cmp.values())
