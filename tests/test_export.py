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
    w4a4 = run_ptq(pretrained, ShapesDataset("calib", 4), "minmax", 4, 4).model
    with pytest.raises(ValueError, match=r"is W4A4; ONNX export needs 8-bit activations \(allowed: W8A8, W4A8\)"):
        export_onnx(w4a4, tmp_path / "q.onnx")
    w3 = run_ptq(pretrained, ShapesDataset("calib", 4), "minmax", 3, 8).model
    with pytest.raises(ValueError, match=r"is W3A8; ONNX export takes weights at 8 bits or at 4 bits symmetric"):
        export_onnx(w3, tmp_path / "q.onnx")
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


# ------------------------------------------------------------------ the fused int8 graph (deploy quantizers)
from detptq_mini.checkpoint import load_quantized, save_quantized  # noqa: E402
from detptq_mini.cli import main  # noqa: E402
from detptq_mini.deploy import compare_graphs, optimized_graph  # noqa: E402
from detptq_mini.pipeline import PTQConfig  # noqa: E402
from detptq_mini.quant import QuantConfig, QuantSiLU, calibrate_deploy, deploy_quantizers  # noqa: E402


@pytest.fixture(scope="module")
def deployed(pretrained):
    return run_ptq(pretrained, ShapesDataset("calib", 32, seed=0), "minmax", 8, 8, deploy=True)


@pytest.fixture(scope="module")
def fused(deployed, tmp_path_factory):
    return export_onnx(deployed.model, tmp_path_factory.mktemp("fused") / "fused.onnx")


def test_deploy_quantizers_are_calibrated_on_and_only_with_deploy(deployed, w8a8):
    d = deploy_quantizers(deployed.model)
    n_act = sum(isinstance(m, QuantSiLU) for m in deployed.model.modules())
    assert len(d) == len(quant_layers(deployed.model)) + n_act == 63 + 57
    assert all(q.enabled and bool(q.calibrated) and q.bits == 8 for q in d.values())
    assert deployed.report["config"]["deploy"] and deployed.report["quant_config"]["deploy"]
    odol = deployed.report["deploy"]["odol"]  # one p for them all, the lowest ODOL of the candidates
    assert len(odol) == 8 and odol[deployed.report["deploy"]["p"]] == min(odol.values())
    # the study methods: nothing of it, and their reports read as before
    assert deploy_quantizers(w8a8) == {}


def test_study_reports_have_no_deploy_key(pretrained):
    r = run_ptq(pretrained, ShapesDataset("calib", 4), "minmax", 4, 8)
    assert "deploy" not in r.report["config"] and "deploy" not in r.report["quant_config"]
    assert deploy_quantizers(r.model) == {}


@pytest.mark.parametrize("dynamo", [False, True])
def test_fused_export_copy_computes_the_twin_bit_for_bit(deployed, dynamo):
    x = ShapesDataset("val", 4).images()
    with torch.no_grad():
        a, b = deployed.model(x), to_qdq(deployed.model, dynamo)(x)
    assert all(torch.equal(u, v) for u, v in zip(a.cls + a.box, b.cls + b.box))


def test_every_quantized_conv_is_an_integer_kernel_in_the_fused_graph(deployed, fused, tmp_path):
    g = optimized_graph(fused)
    assert g["integer_convs"] == len(quant_layers(deployed.model)) == 63 and g["float_convs"] == 0
    assert g["nodes"].get("QLinearSigmoid", 0) == 57 and g["nodes"].get("QLinearMul", 0) > 0
    qdq = optimized_graph(export_onnx(deployed.model, tmp_path / "qdq.onnx", graph="qdq"))
    assert qdq["integer_convs"] == 0 and qdq["float_convs"] == 63  # the first export: float convs


def _conv_weights(path) -> dict:
    """``{layer name: (weight DequantizeLinear, its inputs as initializers)}`` for every conv of the graph at
    ``path`` whose weight comes from a DequantizeLinear (the layer named by the conv's bias), and the graph."""
    import onnx

    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    def init(name):  # the exporter shares equal constants through Identity nodes
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return inits.get(name)

    out = {}
    for conv in (n for n in g.node if n.op_type == "Conv"):
        dq = producer.get(conv.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            out[conv.input[2].removesuffix(".conv.bias")] = (dq, [init(i) for i in dq.input])
    return out, g


def _torch_codes(layer):
    """The weight codes of a QuantConv2d as its quantizer computes them: clamp(round(W * (1/s)) + z)."""
    q, w = layer.weight_quantizer, layer.conv.weight.detach()
    s, z = q.scale.view(-1, 1, 1, 1), q.zero_point.view(-1, 1, 1, 1).float()
    codes = torch.clamp(torch.round(w * (1.0 / s)) + z, q.qmin, q.qmax)
    assert torch.equal((codes - z) * s, q(w))  # the codes are those of the model's own fake-quant weights
    return codes


@pytest.mark.parametrize("kind", ["fused", "qdq", "fused-dynamo"])
def test_weights_are_int8_initializers_of_the_torch_codes(deployed, fused, tmp_path, kind):
    from onnx import TensorProto, numpy_helper

    path = {"fused": lambda: fused, "qdq": lambda: export_onnx(deployed.model, tmp_path / "qdq.onnx", graph="qdq"),
            "fused-dynamo": lambda: export_onnx(deployed.model, tmp_path / "d.onnx", dynamo=True)}[kind]()
    layers = quant_layers(deployed.model)
    weights, g = _conv_weights(path)
    assert set(weights) == set(layers)
    read = {i for n in g.node if n.op_type == "QuantizeLinear" for i in n.input}
    floats = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    assert not any(n.endswith(".conv.weight") for n in read | floats)  # no float weight, no weight Q
    for name, layer in layers.items():
        dq, (w, s, z) = weights[name]
        assert w is not None and w.data_type == TensorProto.INT8, name  # read directly: an int8 initializer
        q = layer.weight_quantizer
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(w).copy()).float(), _torch_codes(layer)), name
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(s).copy()), q.scale), name
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(z).copy()).int(), q.zero_point), name
        assert next(a.i for a in dq.attribute if a.name == "axis") == 0


def test_int8_weights_compute_what_float_weights_did_in_a_quarter_of_the_file(deployed, fused, tmp_path):
    """The earlier form, a float weight and its QuantizeLinear, exported straight from the export copy: ONNX
    Runtime gives the same outputs and fuses the same integer convs; the file is under 2.5 MB (1.5 MB
    measured, the float form 5.5 MB)."""
    import warnings

    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}}
    old = tmp_path / "float_weights.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(to_qdq(deployed.model), (torch.zeros(2, 3, 128, 128),), str(old), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=axes)
    x = ShapesDataset("val", 8, seed=1).images()
    a, b = OnnxDetector(onnx_session(old))(x), OnnxDetector(onnx_session(fused))(x)
    assert all(torch.equal(u, v) for u, v in zip(a.cls + a.box, b.cls + b.box))
    g_old, g_new = optimized_graph(old), optimized_graph(fused)
    assert g_new["integer_convs"] == g_old["integer_convs"] == 63 and g_new["float_convs"] == 0
    assert fused.stat().st_size < 2_500_000 < 4 * 1_000_000 < old.stat().st_size


def test_fused_graph_map_within_0002_of_its_torch_twin(deployed, fused):
    val = ShapesDataset("val", 200, seed=0)
    m_twin = evaluate_model(deployed.model, val)["map"]
    m_ort = evaluate_model(OnnxDetector(onnx_session(fused)), val)["map"]
    assert abs(m_ort - m_twin) <= 0.002, (m_ort, m_twin)


def test_fused_convs_within_a_step_but_the_stem(deployed):
    """ONNX Runtime's u8s8 kernel on a CPU without VNNI saturates pairs of products in int16: the stem (image
    codes up to 255) moves some outputs by several codes; every other conv stays within one step."""
    r = check_layers(deployed.model, ShapesDataset("val", 2).images())
    rest = {n: v for n, v in r["layers"].items() if n != "backbone.stem.conv"}
    assert max(rest.values()) <= 4, max(rest, key=rest.get)


def test_deploy_quantizers_survive_a_checkpoint_round_trip(deployed, pretrained, tmp_path):
    path = tmp_path / "q.pt"
    save_quantized(deployed, path, dict(pretrained.config.__dict__))
    model, report = load_quantized(path)
    a, b = deploy_quantizers(deployed.model), deploy_quantizers(model)
    assert list(a) == list(b) and all(q.enabled for q in b.values())
    assert all(torch.equal(a[n].scale, b[n].scale) and torch.equal(a[n].zero_point, b[n].zero_point) for n in a)
    x = ShapesDataset("val", 2).images()
    with torch.no_grad():
        u, v = deployed.model(x), model(x)
    assert all(torch.equal(p, q) for p, q in zip(u.cls + u.box, v.cls + v.box))
    assert report["quant_config"]["deploy"] is True


def test_deploy_bad_input(pretrained, w8a8, tmp_path):
    with pytest.raises(ValueError, match=r"deploy=True needs a_bits=8 and w_bits 8 or 4 .*W8A8, W4A8"):
        PTQConfig(method="minmax", w_bits=8, a_bits=4, deploy=True)
    with pytest.raises(ValueError, match="deploy=True needs a_bits=8 and w_bits 8 or 4"):
        QuantConfig(w_bits=4, a_bits=4, deploy=True)
    with pytest.raises(ValueError, match="deploy=True needs a_bits=8 and w_bits 8 or 4"):
        QuantConfig(w_bits=6, a_bits=8, deploy=True)
    with pytest.raises(ValueError, match=r"weights='int4' needs a model with 4-bit weights \(W4A8\)"):
        export_onnx(w8a8, tmp_path / "q.onnx", weights="int4")
    with pytest.raises(ValueError, match="weights='int2' is not allowed; allowed: 'int8', 'int4'"):
        export_onnx(w8a8, tmp_path / "q.onnx", weights="int2")
    with pytest.raises(ValueError, match="deploy=.yes. must be a bool"):
        PTQConfig(method="minmax", w_bits=8, a_bits=8, deploy="yes")
    with pytest.raises(ValueError, match="graph='fused' needs the deploy quantizers"):
        export_onnx(w8a8, tmp_path / "q.onnx", graph="fused")
    with pytest.raises(ValueError, match="graph='int4' is not a graph; allowed: 'fused', 'qdq'"):
        export_onnx(w8a8, tmp_path / "q.onnx", graph="int4")
    with pytest.raises(ValueError, match="has no deploy quantizers"):
        calibrate_deploy(w8a8, ShapesDataset("calib", 2).images())
    with pytest.raises(ValueError, match="has no deploy quantizers"):
        compare_graphs(w8a8, ShapesDataset("calib", 2).images(), ShapesDataset("val", 2))
    assert list(tmp_path.iterdir()) == []


def test_compare_graphs_reports_every_graph(deployed):
    calib = ShapesDataset("calib", 8, seed=0).images()
    r = compare_graphs(deployed.model, calib, ShapesDataset("val", 16, seed=0), batches=(1, 2), rounds=1, warmup=0,
                       repeats=1)
    graphs = ("fp32", "fused", "qdq", "ort_quantize_static")
    assert set(r["map"]) == {"fake_quant", *graphs} and r["all_convs_integer"]
    assert r["integer_convs"] == {"fp32": 0, "fused": 63, "qdq": 0, "ort_quantize_static": 63}
    assert set(r["latency_ms"]) == {"b1", "b2"} and all(v > 0 for t in r["latency_ms"].values() for v in t.values())
    assert r["ratio_to_fp32"]["b1"]["fp32"] == 1.0


def test_cli_quantize_deploy_then_export_benchmark_json(tmp_path, capsys):
    import json

    q, m = tmp_path / "q.pt", tmp_path / "m.onnx"
    assert main(["quantize", "--method", "minmax", "--w-bits", "8", "--a-bits", "8", "--calib", "8", "--val", "8",
                 "--deploy", "--out", str(q), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quant_config"]["deploy"] is True
    assert main(["export", "--checkpoint", str(q), "--onnx", str(m), "--val", "16", "--benchmark", "--rounds", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["graph"] == "fused" and out["all_convs_integer"] and out["integer_convs"] == 63
    b = out["benchmark"]
    assert b["rounds"] == 1  # --rounds reached the timing
    assert {"fake_quant", "fused", "qdq", "ort_quantize_static", "fp32"} == set(b["map"])
    assert set(b["latency_ms"]) == {"b1", "b16"} and b["integer_convs"]["ort_quantize_static"] == 63


def test_cli_deploy_errors(tmp_path, capsys, w8a8, pretrained):
    assert main(["quantize", "--method", "minmax", "--w-bits", "8", "--a-bits", "4", "--deploy"]) == 2
    assert "--deploy needs --a-bits 8 and --w-bits 8 or 4" in capsys.readouterr().err
    q = tmp_path / "plain.pt"
    save_quantized(run_ptq(pretrained, ShapesDataset("calib", 4), "minmax", 8, 8), q, dict(pretrained.config.__dict__))
    assert main(["export", "--checkpoint", str(q), "--onnx", str(tmp_path / "m.onnx"), "--val", "0"]) == 2
    err = capsys.readouterr().err
    assert "--graph 'fused' needs the deploy quantizers" in err and "--deploy" in err
    assert main(["export", "--checkpoint", str(q), "--onnx", str(tmp_path / "m.onnx"), "--val", "0",
                 "--graph", "qdq", "--json"]) == 0
    assert not (tmp_path / "m.onnx").with_name("x").exists()


# ------------------------------------------------------------------ 4-bit weights (W4A8): int8 or int4 storage
from detptq_mini.export import INT4_OPSET  # noqa: E402


@pytest.fixture(scope="module")
def w4a8_result(pretrained):
    return run_ptq(pretrained, ShapesDataset("calib", 16, seed=0), "minmax", 4, 8, deploy=True)


@pytest.fixture(scope="module")
def w4a8_deployed(w4a8_result):
    return w4a8_result.model


def test_w4a8_export_copy_computes_the_twin_bit_for_bit(w4a8_deployed):
    x = ShapesDataset("val", 4).images()
    with torch.no_grad():
        a, b = w4a8_deployed(x), to_qdq(w4a8_deployed)(x)
    assert all(torch.equal(u, v) for u, v in zip(a.cls + a.box, b.cls + b.box))


def test_w4a8_int8_weights_run_as_integer_convs_int4_as_float_convs(w4a8_deployed, tmp_path):
    from onnx import TensorProto, numpy_helper

    layers = quant_layers(w4a8_deployed)
    n4 = sum(m.weight_quantizer.bits == 4 for m in layers.values())
    assert n4 == 56 and len(layers) == 63  # the stem and the six prediction convs stay W8A8
    p8 = export_onnx(w4a8_deployed, tmp_path / "w4_int8.onnx")
    p4 = export_onnx(w4a8_deployed, tmp_path / "w4_int4.onnx", weights="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4_int4.onnx", "w4_int8.onnx"]  # atomic
    g8, g4 = optimized_graph(p8), optimized_graph(p4)
    assert g8["integer_convs"] == 63 and g8["float_convs"] == 0
    # ONNX Runtime 1.32 fuses no int4 conv: it dequantizes the int4 weights and runs a float conv
    assert g4["integer_convs"] == 63 - n4 and g4["float_convs"] == n4
    assert qdq_summary(p4)["opset"] == INT4_OPSET
    for path, types in ((p8, {TensorProto.INT8: 63}), (p4, {TensorProto.INT4: n4, TensorProto.INT8: 63 - n4})):
        weights, _ = _conv_weights(path)  # every weight read directly as the torch model's codes
        assert {t: sum(w.data_type == t for _, (w, *_) in weights.values()) for t in types} == types
        for name, layer in layers.items():
            codes = torch.from_numpy(numpy_helper.to_array(weights[name][1][0]).astype("float32"))
            assert torch.equal(codes, _torch_codes(layer)), name
    assert p4.stat().st_size < 0.7 * p8.stat().st_size  # 56 of 63 layers at half the bytes
    x = ShapesDataset("val", 3).images()
    a, b = OnnxDetector(onnx_session(p8))(x), OnnxDetector(onnx_session(p4))(x)
    with torch.no_grad():
        ref = w4a8_deployed(x)
    preds = [n for n in layers if n.endswith(".pred")]  # in output order: cls of each level, then box
    steps = [layers[n].output_quantizer.scale for n in [p for p in preds if ".cls." in p] + [
        p for p in preds if ".box." in p]]
    for u, v, r, step in zip(a.cls + a.box, b.cls + b.box, ref.cls + ref.box, steps):
        assert u.shape == v.shape == r.shape and torch.isfinite(v).all()
        # the same function: int8 codes and int4 storage agree closely; against the torch twin, ONNX Runtime's
        # integer arithmetic (the stem's int16 pairs) moves outputs by a few output codes on average
        assert (u - v).abs().mean() < 0.5 * step and (v - r).abs().mean() < 3 * step


def test_w4a8_graph_map_within_0002_of_its_twin(w4a8_deployed, tmp_path):
    val = ShapesDataset("val", 100, seed=0)
    m_twin = evaluate_model(w4a8_deployed, val)["map"]
    p4 = export_onnx(w4a8_deployed, tmp_path / "w4_int4.onnx", weights="int4")
    m_ort = evaluate_model(OnnxDetector(onnx_session(p4)), val)["map"]
    assert abs(m_ort - m_twin) <= 0.002, (m_ort, m_twin)


def test_int4_needs_the_torchscript_exporter(w4a8_deployed, tmp_path):
    with pytest.raises(ValueError, match=r"weights='int4' needs the TorchScript exporter \(dynamo=False\)"):
        export_onnx(w4a8_deployed, tmp_path / "q.onnx", weights="int4", dynamo=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_weights_int4(w4a8_result, pretrained, tmp_path, capsys):
    import json

    q = tmp_path / "w4.pt"
    save_quantized(w4a8_result, q, dict(pretrained.config.__dict__))
    assert main(["export", "--checkpoint", str(q), "--onnx", str(tmp_path / "m.onnx"), "--val", "0",
                 "--weights", "int4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["opset"] == INT4_OPSET and out["integer_convs"] == 7 and out["float_convs"] == 56


def test_conv_kernel_says_which_bit_widths_run_as_integer_convs():
    from detptq_mini.deploy import conv_kernel

    assert conv_kernel("int8", "uint8")["kernel"] == "QLinearConv"
    w4 = conv_kernel("int4", "uint8")
    assert w4["loads"] and w4["kernel"] == "Conv"  # int4 weights: dequantized, a float conv
    a4 = conv_kernel("int8", "uint4")  # 4-bit activations: ONNX Runtime 1.32 fuses an invalid QLinearConv
    assert not a4["loads"] and "uint4" in a4["error"] and a4["kernel"] is None
    with pytest.raises(ValueError, match="act='int8' is not allowed; allowed: 'uint8', 'uint4'"):
        conv_kernel("int8", "int8")
