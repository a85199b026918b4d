"""DetPTQ's per-layer p selection: the restart cache, the greedy order, the options and the pipeline method."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from detptq_mini.checkpoint import load_quantized, save_quantized
from detptq_mini.data import ShapesDataset
from detptq_mini.detptq import Selection, select_p
from detptq_mini.lp import search_model_scales
from detptq_mini.odol import odol
from detptq_mini.pipeline import PTQConfig, run_ptq
from detptq_mini.quant import QuantConfig, quant_layers, quantization_off, quantize_model

PS = (1.0, 2.0, 4.0)
# an early layer, two layers of one unit, a neck layer (its unit reads two tensors) and two head layers
SUBSET = ["backbone.down1.conv", "backbone.c2f1.m.0.cv2.conv", "backbone.c2f1.cv2.conv", "neck.td3.cv1.conv",
          "head.p4.cls.cv2.conv", "head.p4.box.pred"]


@pytest.fixture(scope="module")
def calib():
    return ShapesDataset("calib", 8, seed=0)


@pytest.fixture(scope="module")
def base(pretrained):
    return quantize_model(pretrained, QuantConfig(w_bits=4, a_bits=4))


@pytest.fixture(scope="module")
def scales(base, calib):
    return search_model_scales(base, calib.images(), PS, max_elements=2**14)


@pytest.fixture()
def qmodel(base):
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def fp_out(base, calib):
    q = copy.deepcopy(base)
    with torch.no_grad(), quantization_off(q):
        return q(calib.images())


def _full_odol(q, scales, x, fp_out, state, rest, rest_p=2.0):
    """ODOL of a full forward with ``state = {layer: (w_p, a_p)}``; the other layers follow ``rest``."""
    for name, layer in quant_layers(q).items():
        w_p, a_p = state.get(name, (rest_p, rest_p) if rest == "quantized" else (None, None))
        if w_p is not None:
            layer.weight_quantizer.set_qparams(*scales[name].weight[w_p])
        if a_p is not None:
            layer.input_quantizer.set_qparams(*scales[name].act[a_p])
        layer.set_quant_state(w_p is not None, a_p is not None)
    with torch.no_grad():
        return float(odol(fp_out, q(x)))


def _state_for(sel: Selection, item, w_p, a_p):
    """Items before ``item`` at their chosen p, ``item`` at the candidate, later ones left to ``rest``."""
    state = {}
    for it in sel.order:
        if it == item:
            state.update({n: (w_p, a_p) for n in sel.groups[it]})
            break
        state.update({n: (sel.chosen_weight[it], sel.chosen_act[it]) for n in sel.groups[it]})
    return state


def _assert_final_state(q, scales, sel, rest_p=2.0):
    w, a = sel.layer_p("weight"), sel.layer_p("act")
    for name, layer in quant_layers(q).items():
        assert layer.weight_quantizer.enabled and layer.input_quantizer.enabled
        assert torch.equal(layer.weight_quantizer.scale, scales[name].weight[w.get(name, rest_p)][0])
        assert torch.equal(layer.input_quantizer.scale, scales[name].act[a.get(name, rest_p)][0])
        assert torch.equal(layer.input_quantizer.zero_point, scales[name].act[a.get(name, rest_p)][1])


@pytest.mark.parametrize("rest", ["fp", "quantized"])
def test_cached_odol_equals_full_forward_and_is_greedy(qmodel, scales, calib, fp_out, rest):
    x = calib.images()
    sel = select_p(qmodel, x, scales, ps=PS, rest=rest, layers=SUBSET)
    assert sel.order == tuple(SUBSET) and sel.granularity == "layer" and not sel.separate
    assert all(set(row) == set(PS) for row in sel.table.values())
    _assert_final_state(qmodel, scales, sel)
    ref = copy.deepcopy(qmodel)
    # every candidate of every layer, recomputed with a full forward of the same quantized model (earlier
    # layers at their chosen p, later ones per `rest`): the restart cache and the greedy order are right
    for item in sel.order:
        for p in PS:
            want = _full_odol(ref, scales, x, fp_out, _state_for(sel, item, p, p), rest)
            assert sel.table[item][p] == pytest.approx(want, rel=1e-6, abs=1e-9), (item, p)
    # the greedy property is not vacuous: with the earlier layers left out, a later candidate scores otherwise
    last, p = sel.order[-1], PS[0]
    alone = _full_odol(ref, scales, x, fp_out, {sel.order[-1]: (p, p)}, rest)
    assert alone != pytest.approx(sel.table[last][p], rel=1e-4)


def test_chosen_is_the_argmin_of_each_row_and_the_selection_is_json_ready(qmodel, scales, calib):
    sel = select_p(qmodel, calib.images(), scales, ps=PS, layers=SUBSET)
    for item, row in sel.table.items():
        assert sel.chosen[item] == min(PS, key=lambda p: (row[p], PS.index(p)))
        assert row[sel.chosen[item]] == min(row.values())
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["chosen"] == sel.chosen and d["order"] == list(SUBSET)
    assert d["table"][SUBSET[0]]["2.0"] == sel.table[SUBSET[0]][2.0]
    assert d["config"]["ps"] == list(PS) and d["config"]["layers"] == SUBSET and d["config"]["rest"] == "fp"
    assert sel.layer_p() == sel.chosen


def test_rest_quantized_differs_from_rest_fp(base, scales, calib):
    x = calib.images()
    a = select_p(copy.deepcopy(base), x, scales, ps=PS, rest="fp", layers=SUBSET[:3])
    b = select_p(copy.deepcopy(base), x, scales, ps=PS, rest="quantized", layers=SUBSET[:3])
    for item in a.order:
        for p in PS:  # later layers quantized at p = 2 add their own error to every candidate
            assert b.table[item][p] > a.table[item][p]
    assert b.config["rest"] == "quantized"


def test_unit_granularity_gives_one_p_per_unit(qmodel, scales, calib, fp_out):
    x = calib.images()
    sel = select_p(qmodel, x, scales, ps=PS, granularity="unit")
    assert sel.order == qmodel.unit_names  # every unit of the detector holds quantized convs
    layers = list(quant_layers(qmodel))
    assert [n for u in sel.order for n in sel.groups[u]] == layers
    assert all(qmodel.unit_of(n) == u for u, names in sel.groups.items() for n in names)
    per_layer = sel.layer_p()
    for unit, names in sel.groups.items():
        assert {per_layer[n] for n in names} == {sel.chosen[unit]}
        assert sel.chosen[unit] == min(PS, key=lambda p: (sel.table[unit][p], PS.index(p)))
    _assert_final_state(qmodel, scales, sel)
    ref = copy.deepcopy(qmodel)
    for unit in ("backbone.c2f2", "neck.bu4", "head.p5.cls"):  # all quantizers of the unit at one candidate
        want = _full_odol(ref, scales, x, fp_out, _state_for(sel, unit, 4.0, 4.0), "fp")
        assert sel.table[unit][4.0] == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_separate_chooses_weight_then_activation_p(qmodel, scales, calib, fp_out):
    x = calib.images()
    sel = select_p(qmodel, x, scales, ps=PS, separate=True, layers=SUBSET)
    with pytest.raises(ValueError, match="chosen_weight"):
        sel.chosen
    for item in sel.order:
        w = sel.chosen_weight[item]
        assert w == min(PS, key=lambda p: (sel.table[item][p], PS.index(p)))
        assert sel.table_act[item][w] == sel.table[item][w]  # the joint winner is one of the activation candidates
        assert sel.chosen_act[item] == min(PS, key=lambda p: (sel.table_act[item][p], PS.index(p)))
        assert min(sel.table_act[item].values()) <= min(sel.table[item].values())
    _assert_final_state(qmodel, scales, sel)
    ref = copy.deepcopy(qmodel)
    item = SUBSET[3]
    for a_p in PS:  # weights at the chosen weight p, the activation at the candidate
        want = _full_odol(ref, scales, x, fp_out, _state_for(sel, item, sel.chosen_weight[item], a_p), "fp")
        assert sel.table_act[item][a_p] == pytest.approx(want, rel=1e-6, abs=1e-9)
    d = json.loads(json.dumps(sel.to_dict()))
    assert {"chosen_weight", "chosen_act", "table", "table_act"} <= set(d) and "chosen" not in d


def test_batches_combine_to_the_whole_batch_odol(base, scales, calib):
    x = calib.images()
    a = select_p(copy.deepcopy(base), x, scales, ps=PS, layers=SUBSET[-3:], batch_size=8)
    b = select_p(copy.deepcopy(base), x, scales, ps=PS, layers=SUBSET[-3:], batch_size=3)
    for item in a.order:
        for p in PS:
            assert b.table[item][p] == pytest.approx(a.table[item][p], rel=1e-5)


def test_scales_are_searched_when_not_given_and_progress_bar(qmodel, scales, calib, capsys):
    sel = select_p(qmodel, calib.images(), ps=PS, layers=SUBSET[:1], progress=True)
    assert sel.order == (SUBSET[0],)
    assert "DetPTQ p selection" in capsys.readouterr().err
    layer = quant_layers(qmodel)[SUBSET[0]]  # searched on the same images: the fixture's scales
    assert torch.equal(layer.weight_quantizer.scale, scales[SUBSET[0]].weight[sel.chosen[SUBSET[0]]][0])


@pytest.mark.parametrize("kwargs, word", [
    (dict(granularity="block"), "granularity"),
    (dict(rest="half"), "rest"),
    (dict(odol="kl"), "odol must be an OdolConfig"),
    (dict(ps=()), "ps"),
    (dict(ps=(0.0, 2.0)), "ps"),
    (dict(batch_size=0), "batch_size"),
    (dict(separate="yes"), "separate"),
    (dict(layers=["backbone.nope"]), r"layers has \['backbone.nope'\] that are not quantized layers"),
    (dict(layers=[]), "layers=.* is empty"),
    (dict(ps=(1.5,)), "lack p"),
    (dict(images=torch.zeros(0, 3, 128, 128)), "empty"),
    (dict(images=torch.zeros(2, 1, 128, 128)), "images"),
    (dict(images=torch.full((2, 3, 128, 128), float("nan"))), "NaN"),
])
def test_bad_arguments(qmodel, scales, calib, kwargs, word):
    kwargs = {"images": calib.images(), "scales": scales, "ps": PS, **kwargs}
    with pytest.raises(ValueError, match=word):
        select_p(qmodel, **kwargs)


def test_an_fp_model_is_refused(pretrained, calib):
    with pytest.raises(ValueError, match="QuantConv2d"):
        select_p(pretrained, calib.images(), ps=PS)


def test_a_module_that_is_not_a_unit_detector_is_refused(calib):
    plain = quantize_model(nn.Sequential(nn.Conv2d(3, 3, 1)))
    message = r"qmodel must be a UnitDetector \(a restartable detector: .*\); got Sequential"
    with pytest.raises(ValueError, match=message):
        select_p(plain, calib.images(), ps=PS)


# ------------------------------------------------------------------ pipeline and command line
def test_run_ptq_detptq_uses_the_chosen_scales(pretrained, calib, tmp_path):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    res = run_ptq(pretrained, calib, "detptq", 4, 4, ps=PS, max_elements=2**14)
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in before.items())  # input model unchanged
    r = res.report
    assert r["method"] == "detptq" and r["config"]["p"] is None and r["config"]["ps"] == PS
    layers = quant_layers(res.model)
    assert list(r["chosen_p"]) == list(layers) and set(r["chosen_p"].values()) <= set(PS)
    assert r["selection"]["chosen"] == r["chosen_p"] and len(r["selection"]["table"]) == 63
    want = search_model_scales(quantize_model(pretrained, QuantConfig(w_bits=4, a_bits=4)), calib.images(), PS,
                               max_elements=2**14)
    for name, layer in layers.items():
        p = r["chosen_p"][name]
        assert layer.weight_quantizer.enabled and layer.input_quantizer.enabled
        assert torch.equal(layer.weight_quantizer.scale, want[name].weight[p][0])
        assert torch.equal(layer.input_quantizer.scale, want[name].act[p][0])
    path = tmp_path / "q.pt"  # the report (with the selection) survives the checkpoint
    save_quantized(res, path, dict(pretrained.config.__dict__))
    _, report = load_quantized(path)
    assert report["chosen_p"] == r["chosen_p"] and report["selection"] == r["selection"]


def test_run_ptq_detptq_options(pretrained, calib):
    res = run_ptq(pretrained, calib, "detptq", 4, 8, ps=(1.0, 4.0), granularity="unit", separate=True,
                  rest="quantized", odol_loc="iou", select_images=4, max_elements=2**12)
    r = res.report
    assert set(r["chosen_p"]) == {"weight", "act"} and len(r["chosen_p"]["act"]) == 63
    sel = r["selection"]
    assert sel["granularity"] == "unit" and sel["config"]["images"] == 4 and sel["config"]["loc"] == "iou"
    assert sel["config"]["rest"] == "quantized" and len(sel["order"]) == len(pretrained.unit_names)
    with pytest.raises(ValueError, match="select_images"):
        run_ptq(pretrained, calib, "detptq", 4, 4, ps=PS, select_images=9)


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="detptq", p=2.0), "p="),
    (dict(method="lp", granularity="unit"), "only apply to the methods 'detptq'"),
    (dict(method="minmax", separate=True), "only apply to the methods 'detptq'"),
    (dict(method="detptq", granularity="block"), "granularity"),
    (dict(method="detptq", rest="half"), "rest"),
    (dict(method="detptq", odol_cls="ce"), "odol_cls"),
    (dict(method="detptq", odol_lam=-1.0), "odol_lam"),
    (dict(method="detptq", ps=()), "ps"),
    (dict(method="detptq", select_images=0), "select_images"),
])
def test_bad_detptq_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PTQConfig(**kwargs)


def test_cli_quantize_detptq_json():
    r = subprocess.run([sys.executable, "-m", "detptq_mini.cli", "quantize", "--method", "detptq", "--w-bits", "4",
                        "--a-bits", "8", "--calib", "8", "--val", "20", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["method"] == "detptq" and res["config"]["p"] is None and 0 < res["map"] <= 1
    assert len(res["chosen_p"]) == 63 and set(res["chosen_p"].values()) <= {1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5}
