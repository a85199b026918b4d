import pytest
import torch

from detptq_mini.data import ShapesDataset
from detptq_mini.odol import OdolConfig
from detptq_mini.studies import l_perf, scale_sweep, spearman, sweep_agreement
from detptq_mini.quant import QuantConfig, quant_layers, quantize_model


def test_spearman_matches_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0
    # with ties: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)


@pytest.fixture(scope="module")
def sweep(pretrained):
    q = quantize_model(pretrained, QuantConfig(w_bits=4, a_bits=4))
    ds = ShapesDataset("val", 8, seed=3)
    return q, ds, scale_sweep(q, "head.p3.box.cv2.conv", ds, [0.3, 0.6, 1.0])


def test_sweep_records_every_metric_and_matches_a_full_forward(sweep):
    q, ds, sw = sweep
    assert sw["ratios"] == [0.3, 0.6, 1.0] and len(sw["l_perf"]) == 3
    assert set(sw["odol"]) == {"kl+l1", "kl+iou", "l2+l1", "l2+iou"}
    assert all(v > 0 for vals in sw["odol"].values() for v in vals)
    # r = 1 is min-max: the same L_perf as quantizing that layer alone with a min-max calibration, full forward
    from detptq_mini.quant import calibrate_minmax, set_quant_state

    calibrate_minmax(q, ds.images())
    set_quant_state(q, weights=False, acts=False)
    quant_layers(q)["head.p3.box.cv2.conv"].set_quant_state(True, True)
    assert l_perf(q, ds, batch_size=8) == pytest.approx(sw["l_perf"][-1], rel=1e-5)
    assert sw["fp_l_perf"] < min(sw["l_perf"])


def test_sweep_restores_the_model_state(pretrained):
    q = quantize_model(pretrained, QuantConfig(w_bits=4, a_bits=4))
    before = {n: (m.weight_quantizer.enabled, m.input_quantizer.enabled) for n, m in quant_layers(q).items()}
    sw = scale_sweep(q, "neck.td3.cv1.conv", ShapesDataset("val", 4, seed=0), [0.5, 1.0], variants=[("kl", "l1")],
                     config=OdolConfig(fg="hard", lam=0.5))
    assert list(sw["odol"]) == ["kl+l1"] and len(sw["odol"]["kl+l1"]) == 2
    after = {n: (m.weight_quantizer.enabled, m.input_quantizer.enabled) for n, m in quant_layers(q).items()}
    assert before == after
    assert not bool(quant_layers(q)["neck.td3.cv1.conv"].input_quantizer.calibrated)


def test_agreement_summary():
    sw = {"a": {"ratios": [0.5, 1.0], "l_perf": [1.0, 2.0], "odol": {"kl+l1": [0.1, 0.2], "l2+l1": [0.3, 0.1]}},
          "b": {"ratios": [0.5, 1.0], "l_perf": [2.0, 1.0], "odol": {"kl+l1": [0.2, 0.1], "l2+l1": [0.3, 0.1]}}}
    agree = sweep_agreement(sw)
    assert agree["kl+l1"]["argmin_distance"] == 0.0 and agree["kl+l1"]["spearman"] == pytest.approx(1.0)
    assert agree["l2+l1"]["argmin_distance"] == pytest.approx(0.25) and agree["l2+l1"]["spearman"] == 0.0


def test_bad_arguments(pretrained):
    q = quantize_model(pretrained, QuantConfig())
    ds = ShapesDataset("val", 2, seed=0)
    with pytest.raises(ValueError, match=r"layer has \['nope'\] that are not quantized layers"):
        scale_sweep(q, "nope", ds, [1.0])
    with pytest.raises(ValueError, match="ratios="):
        scale_sweep(q, "neck.td3.cv1.conv", ds, [0.0])
    with pytest.raises(ValueError, match="cls"):
        scale_sweep(q, "neck.td3.cv1.conv", ds, [1.0], variants=[("kl2", "l1")])
    with pytest.raises(ValueError, match="labelled"):
        scale_sweep(q, "neck.td3.cv1.conv", torch.zeros(2, 3, 128, 128), [1.0])
    with pytest.raises(ValueError, match="config must be an OdolConfig"):
        scale_sweep(q, "neck.td3.cv1.conv", ds, [1.0], config={"fg": "hard"})
