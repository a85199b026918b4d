"""Block reconstruction: the config, the loss, one unit and the whole detector, the V ablation, and the three
reconstruction methods through run_ptq (QDrop's quantizer and masks: test_qdrop.py)."""

import copy

import pytest
import torch
from torch import nn

from detptq_mini.adaround import AdaRoundQuantizer
from detptq_mini.data import ShapesDataset
from detptq_mini.lp import search_model_scales
from detptq_mini.pipeline import PTQConfig, run_ptq
from detptq_mini.qdrop import QDropQuantizer
from detptq_mini.quant import (QuantConfig, QuantConv2d, Quantizer, calibrate_minmax, fake_quantize, fold_bn,
                               qparams_from_range, quant_layers, quantize_model)
from detptq_mini.reconstruction import ReconConfig, lp_loss, reconstruct, reconstruct_unit
from detptq_mini.studies import rounding_ablation


@pytest.fixture(scope="module")
def calib():
    return ShapesDataset("calib", 8, seed=0)


@pytest.fixture(scope="module")
def minmax_w4a4(pretrained, calib):
    q = quantize_model(pretrained, QuantConfig(w_bits=4, a_bits=4))
    return calibrate_minmax(q, calib.images())


# ------------------------------------------------------------------ pieces
@pytest.mark.parametrize("kwargs, word", [
    (dict(iters=0), "iters"), (dict(batch_size=0), "batch_size"), (dict(quant_prob=0.0), "quant_prob"),
    (dict(quant_prob=1.5), "quant_prob"), (dict(p=0), "p="), (dict(p=float("nan")), "p="),
    (dict(warmup=1.0), "warmup"), (dict(beta=(20.0,)), "beta"), (dict(beta=(20.0, -2.0)), "beta"),
    (dict(lr_v=0.0), "lr_v"), (dict(lam=-1.0), "lam"), (dict(iters=True), "iters"),
    (dict(loss_norm="mean"), "loss_norm='mean' is not allowed; allowed: 'none', 'before'"),
])
def test_bad_recon_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ReconConfig(**kwargs)


def test_lp_loss_sums_channels_and_averages_the_rest():
    out, target = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
    target[0, :, 0, 0] = 2.0  # one location of one sample: 3 channels of error 2
    assert lp_loss(out, target, 2.0).item() == pytest.approx(3 * 4 / 40)
    assert lp_loss(out, target, 1.0).item() == pytest.approx(3 * 2 / 40)
    assert lp_loss(out, target, 3.0).item() == pytest.approx(3 * 8 / 40)


def _conv_layer(seed=0):
    torch.manual_seed(seed)
    layer = QuantConv2d(nn.Conv2d(8, 8, 3, padding=1), w_bits=3, a_bits=8)
    w = layer.conv.weight.detach().reshape(8, -1)
    layer.weight_quantizer.set_qparams(*qparams_from_range(w.amin(1), w.amax(1), 3, True))
    # spatially and across channels correlated inputs: where rounding to nearest is not optimal (with i.i.d.
    # inputs the output error's Hessian is diagonal and round-to-nearest is already the best rounding)
    x = torch.nn.functional.interpolate(torch.randn(64, 8, 3, 3), size=8, mode="bilinear", align_corners=True)
    x = x + 0.8 * x.mean(1, keepdim=True)
    layer.input_quantizer.set_qparams(*qparams_from_range(x.min(), x.max(), 8, False))
    return layer, x


@pytest.mark.parametrize("quant_prob", [1.0, 0.5])
def test_reconstructing_one_layer_lowers_its_output_error(quant_prob):
    layer, x = _conv_layer()
    with torch.no_grad():
        y = layer.conv(x)
    cfg = ReconConfig(iters=300, batch_size=16, quant_prob=quant_prob, lam=0.001, lr_v=0.01)
    h = reconstruct_unit(layer, [x], [x], y, 2.0, cfg, "layer")
    assert h.after < 0.7 * h.before, (h.before, h.after)
    assert len(h.loss) == 300 and len(h.reg) == 300 and all(r == 0 for r in h.reg[:60]) and h.reg[-1] >= 0
    assert h.flipped["layer"] > 0
    # back to plain quantizers, weights on the grid
    assert isinstance(layer.weight_quantizer, Quantizer) and isinstance(layer.input_quantizer, Quantizer)
    q = layer.weight_quantizer
    w = layer.conv.weight.detach()
    assert torch.equal(fake_quantize(w, q.scale, q.zero_point, q.qmin, q.qmax, 0), w)


def test_loss_norm_before_divides_the_loss_by_its_value_before_reconstruction():
    """With ``loss_norm="before"`` the logged loss is the plain one divided by ``before``: the first step (identical
    batch, masks and parameters in both runs) is the same loss in other units."""
    runs = {}
    for norm in ("none", "before"):
        layer, x = _conv_layer()
        with torch.no_grad():
            y = layer.conv(x)
        cfg = ReconConfig(iters=60, batch_size=16, quant_prob=1.0, lam=0.001, lr_v=0.01, loss_norm=norm)
        runs[norm] = reconstruct_unit(layer, [x], [x], y, 2.0, cfg, "layer")
    plain, normed = runs["none"], runs["before"]
    assert plain.before == pytest.approx(normed.before, rel=1e-6) and plain.before > 0
    assert normed.loss[0] == pytest.approx(plain.loss[0] / plain.before, rel=1e-5)
    # AdaRound starts from soft weights equal to the FP ones: far below the round-to-nearest loss (1 here)
    assert normed.loss[0] < 0.1, normed.loss[0]
    assert normed.after < normed.before  # it still reconstructs (before/after stay in the loss's own units)
    # the loss's scale moves the balance with the regulariser: the two runs end in different places
    assert plain.loss[-1] / plain.before != pytest.approx(normed.loss[-1], rel=1e-3)


def test_reconstruct_unit_checks_its_inputs():
    layer, x = _conv_layer()
    y = layer.conv(x).detach()
    with pytest.raises(ValueError, match="same number of samples"):
        reconstruct_unit(layer, [x[:10]], [x[:10]], y, 2.0, ReconConfig(iters=1))
    with pytest.raises(ValueError, match="same length"):
        reconstruct_unit(layer, [x], [], y, 2.0, ReconConfig(iters=1))
    with pytest.raises(ValueError, match="ReconConfig"):
        reconstruct_unit(layer, [x], [x], y, 2.0, {"iters": 1})
    with pytest.raises(ValueError, match="p="):
        reconstruct_unit(layer, [x], [x], y, -1.0, ReconConfig(iters=1))
    with pytest.raises(ValueError, match="no QuantConv2d"):
        reconstruct_unit(nn.Conv2d(8, 8, 1), [x], [x], y, 2.0, ReconConfig(iters=1))


# ------------------------------------------------------------------ the detector
def test_reconstruct_the_detector_is_deterministic_and_leaves_plain_quantizers(pretrained, minmax_w4a4, calib):
    images = calib.images()
    fp = fold_bn(pretrained)
    cfg = ReconConfig(iters=4, batch_size=4, quant_prob=0.5)
    states = []
    for _ in range(2):
        q = copy.deepcopy(minmax_w4a4)
        hist = reconstruct(q, fp, images, cfg, unit_p={"head.p3.box": 3.0})
        states.append(q.state_dict())
    assert list(hist.units) == list(pretrained.unit_names)
    assert hist.units["head.p3.box"].p == 3.0 and hist.units["neck.td4"].p == 2.0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not any(isinstance(m, (AdaRoundQuantizer, QDropQuantizer)) for m in q.modules())
    for name, layer in quant_layers(q).items():
        wq, w = layer.weight_quantizer, layer.conv.weight.detach()
        assert torch.equal(fake_quantize(w, wq.scale, wq.zero_point, wq.qmin, wq.qmax, wq.axis), w), name
    s = hist.summary()
    assert set(s) == {"config", "units", "seconds"} and s["config"]["iters"] == 4
    assert all(u["before"] > 0 and u["after"] > 0 for u in s["units"].values())


def test_reconstruct_only_some_units(pretrained, minmax_w4a4, calib):
    q = copy.deepcopy(minmax_w4a4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    hist = reconstruct(q, fold_bn(pretrained), calib.images(), ReconConfig(iters=2, batch_size=4),
                       units=["neck.down4"])
    assert list(hist.units) == ["neck.down4"]
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("neck.down4.") for k in changed)


def test_brecq_two_stages_weights_with_activations_off_then_step_sizes(pretrained, minmax_w4a4, calib, monkeypatch):
    """BRECQ as published: a pass over the units learns the rounding with every activation quantizer off, then a
    second pass learns only the step sizes (weights fixed) on the FP model's unit inputs."""
    import detptq_mini.reconstruction as rec

    calls = []
    real = rec.reconstruct_unit

    def spy(module, x_q, x_fp, y_fp, p=None, config=None, name="unit", progress=False, learn="both"):
        acts_on = [m.input_quantizer.enabled for m in rec._unit_layers(module, name).values()]
        calls.append((name, learn, p, all(a is x for a, x in zip(x_q, x_fp)), acts_on))
        return real(module, x_q, x_fp, y_fp, p, config, name, progress, learn)

    monkeypatch.setattr(rec, "reconstruct_unit", spy)
    units = ["backbone.c2f2", "neck.td3"]
    fp, images = fold_bn(pretrained), calib.images()
    q = copy.deepcopy(minmax_w4a4)
    scales0 = {n: m.input_quantizer.scale.clone() for n, m in quant_layers(q).items()}
    weights0 = {n: m.conv.weight.clone() for n, m in quant_layers(q).items()}
    cfg = ReconConfig(iters=4, batch_size=4, quant_prob=1.0, stages=2, act_iters=3, lr_act=1e-2)
    hist = reconstruct(q, fp, images, cfg, units=units)
    assert [(c[0], c[1]) for c in calls] == [(u, "weights") for u in units] + [(u, "acts") for u in units]
    for name, learn, p, fp_input, acts_on in calls:
        if learn == "weights":  # activations off, quantized-prefix input, the config's p
            assert not any(acts_on) and p == 2.0 and (name == units[0] or not fp_input)
        else:  # activations on, the FP input (the reference's asym=False), the second stage's p
            assert all(acts_on) and p == 2.4 and fp_input
    for u in units:
        h = hist.units[u]
        assert len(h.loss) == 4 and len(h.act_loss) == 3 and h.before > 0 and h.after_mse > 0
    changed = [n for n, m in quant_layers(q).items() if not torch.equal(m.input_quantizer.scale, scales0[n])]
    assert changed and all(n.startswith(tuple(units)) for n in changed)
    assert all(m.input_quantizer.enabled for m in quant_layers(q).values())  # the quantizers are back on
    # act_iters=0: the step sizes are left as they are, the rounding is learned
    q2 = copy.deepcopy(minmax_w4a4)
    reconstruct(q2, fp, images, ReconConfig(iters=4, batch_size=4, stages=2, quant_prob=1.0, act_iters=0), units=units)
    assert all(torch.equal(m.input_quantizer.scale, scales0[n]) for n, m in quant_layers(q2).items())
    assert any(not torch.equal(m.conv.weight, weights0[n]) for n, m in quant_layers(q2).items())


def test_reconstruct_bad_arguments(pretrained, minmax_w4a4, calib):
    fp, images, cfg = fold_bn(pretrained), calib.images(), ReconConfig(iters=1)
    with pytest.raises(ValueError, match="unit_p"):
        reconstruct(copy.deepcopy(minmax_w4a4), fp, images, cfg, unit_p={"nope": 2.0})
    with pytest.raises(ValueError, match="unit_p"):
        reconstruct(copy.deepcopy(minmax_w4a4), fp, images, cfg, unit_p={"neck.td4": 0.0})
    with pytest.raises(ValueError, match="units="):
        reconstruct(copy.deepcopy(minmax_w4a4), fp, images, cfg, units=["backbone"])
    with pytest.raises(ValueError, match="restartable"):
        reconstruct(copy.deepcopy(minmax_w4a4), nn.Conv2d(3, 3, 1), images, cfg)
    with pytest.raises(ValueError, match="QuantConv2d"):
        reconstruct(fp, fp, images, cfg)
    with pytest.raises(ValueError, match="empty"):
        reconstruct(copy.deepcopy(minmax_w4a4), fp, images[:0], cfg)


def test_rounding_ablation_tables_and_restores_the_model(minmax_w4a4, calib):
    q = copy.deepcopy(minmax_w4a4)
    images = calib.images()
    layers = ["backbone.down2.conv", "head.p3.box.cv2.conv"]
    scales = search_model_scales(q, images, (2.0, 3.0), layers=layers, max_elements=2**12)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    ab = rounding_ablation(q, images, scales, layers, ps=(2.0, 3.0), iters=5)
    assert set(ab.scale) == set(ab.rounding) == set(layers)
    assert all(set(row) == {2.0, 3.0} for row in list(ab.scale.values()) + list(ab.rounding.values()))
    assert all(v >= 0 for row in ab.scale.values() for v in row.values())
    assert set(ab.best("scale").values()) <= {2.0, 3.0} and set(ab.moved()) == set(layers)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="scales lacks"):
        rounding_ablation(q, images, scales, layers, ps=(2.5,), iters=1)
    with pytest.raises(ValueError, match="kind"):
        ab.best("v")


# ------------------------------------------------------------------ run_ptq
@pytest.mark.parametrize("method, prob, stages", [("brecq", 1.0, 2), ("joint", 1.0, 1), ("qdrop", 0.5, 1),
                                                  ("detptq-qdrop", 0.5, 1)])
def test_reconstruction_methods_through_run_ptq(pretrained, calib, method, prob, stages):
    opts = dict(iters=2, recon_batch_size=4, max_elements=2**12)
    if method == "detptq-qdrop":
        opts.update(ps=(2.0, 3.0))
    res = run_ptq(pretrained, calib, method, 4, 4, **opts)
    r = res.report
    assert r["config"]["quant_prob"] == prob and r["config"]["iters"] == 2
    assert r["config"]["stages"] == stages == r["reconstruction"]["config"]["stages"]
    assert r["config"]["qdrop_input"] == ("one-coin" if prob < 1 else None)
    if method == "brecq":  # the second stage: a quarter of the steps (at least 1), p = 2.4, the reference's rate
        assert (r["config"]["act_iters"], r["config"]["act_p"], r["config"]["lr_act"]) == (1, 2.4, 4e-4)
        assert all(len(h.act_loss) == 1 for h in res.history.units.values())
    else:
        assert r["config"]["act_iters"] is None and all(not h.act_loss for h in res.history.units.values())
    assert set(r["reconstruction"]["units"]) == set(pretrained.unit_names)
    assert res.history is not None and len(res.history.units["neck.td4"].loss) == 2
    assert len(r["chosen_p"]) == 63
    if method == "detptq-qdrop":
        sel = r["selection"]
        assert sel["granularity"] == "unit" and r["config"]["granularity"] == "unit"
        for unit, layers in sel["groups"].items():  # one p per unit: the selection's and the loss's
            assert {r["chosen_p"][n] for n in layers} == {sel["chosen"][unit]}
            assert r["reconstruction"]["units"][unit]["p"] == sel["chosen"][unit]
    else:
        assert set(r["chosen_p"].values()) == {2.0}
        assert {u["p"] for u in r["reconstruction"]["units"].values()} == {2.0}


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="detptq-qdrop", p=2.0), "takes no p"),
    (dict(method="brecq", quant_prob=0.5), "method='brecq' quantizes every activation element"),
    (dict(method="joint", quant_prob=0.5), "method='joint' quantizes every activation element"),
    (dict(method="brecq", stages=1), "method='brecq' has 2 stage"),
    (dict(method="qdrop", stages=2), "method='qdrop' has 1 stage"),
    (dict(method="brecq", qdrop_input="two-coin"), "qdrop_input only applies to the method.s. qdrop, detptq-qdrop"),
    (dict(method="qdrop", qdrop_input="three"), "qdrop_input='three' is not allowed"),
    (dict(method="qdrop", act_iters=5), "act_iters only applies to the method.s. brecq"),
    (dict(method="brecq", act_p=0), "act_p"),
    (dict(method="qdrop", detptq_use="loss"), "detptq_use=.loss. only applies to the method .detptq-qdrop."),
    (dict(method="detptq-qdrop", detptq_use="half"), "detptq_use=.half. is not allowed"),
    (dict(method="minmax", iters=10), "only apply to the reconstruction methods"),
    (dict(method="lp", quant_prob=0.5), "only apply to the reconstruction methods"),
    (dict(method="detptq-qdrop", granularity="layer"), "granularity must be 'unit'"),
    (dict(method="detptq-qdrop", separate=True), "separate"),
    (dict(method="qdrop", iters=0), "iters"),
    (dict(method="qdrop", quant_prob=2.0), "quant_prob"),
    (dict(method="qdrop", recon_loss_norm="all"), "loss_norm='all' is not allowed"),
    (dict(method="lp", recon_loss_norm="before"), "recon_loss_norm only apply to the reconstruction methods"),
])
def test_bad_reconstruction_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PTQConfig(**kwargs)


def test_reconstruction_defaults_are_resolved_in_the_config():
    cfg = PTQConfig(method="qdrop")
    assert (cfg.iters, cfg.recon_batch_size, cfg.quant_prob, cfg.round_lam, cfg.p) == (2000, 32, 0.5, 0.01, 2.0)
    assert PTQConfig(method="brecq").quant_prob == 1.0 == PTQConfig(method="joint").quant_prob
    brecq = PTQConfig(method="brecq", iters=1000)
    assert (brecq.stages, brecq.act_iters, brecq.act_p, brecq.lr_act) == (2, 250, 2.4, 4e-4)
    assert PTQConfig(method="joint").stages == 1 and PTQConfig(method="joint").lr_act == 4e-5
    assert PTQConfig(method="qdrop").qdrop_input == "one-coin" == ReconConfig().qdrop_input
    assert PTQConfig(method="detptq").granularity == "layer"
    assert PTQConfig(method="detptq-qdrop").granularity == "unit"
    assert PTQConfig(method="minmax").iters is None
    assert PTQConfig(method="qdrop").recon_loss_norm == "none"
    assert PTQConfig(method="brecq", recon_loss_norm="before").recon_config().loss_norm == "before"


# ------------------------------------------------------------------ command line
def test_cli_quantize_with_reconstruction(capsys):
    from detptq_mini.cli import main

    code = main(["quantize", "--method", "qdrop", "--w-bits", "4", "--a-bits", "8", "--iters", "2",
                 "--calib", "8", "--val", "16", "--loss-norm", "before", "--json"])
    assert code == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "qdrop" and out["config"]["iters"] == 2 and out["config"]["quant_prob"] == 0.5
    assert out["config"]["recon_loss_norm"] == "before" == out["reconstruction"]["config"]["loss_norm"]
    assert 0 <= out["map"] <= 1 and set(out["chosen_p"].values()) == {2.0}
    units = out["reconstruction"]["units"]  # the per-unit report reaches the JSON (and so the benchmark files)
    assert len(units) == 22 and all(u["p"] == 2.0 and u["after"] >= 0 for u in units.values())
    assert out["timings"]["reconstruction"] > 0


def test_cli_quantize_brecq_runs_the_two_stage_method(capsys):
    from detptq_mini.cli import main
    import json

    code = main(["quantize", "--method", "brecq", "--w-bits", "4", "--a-bits", "4", "--iters", "4",
                 "--calib", "8", "--val", "16", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    cfg = out["reconstruction"]["config"]
    assert out["method"] == "brecq" and out["config"]["stages"] == 2 == cfg["stages"]
    assert (cfg["act_iters"], cfg["act_p"], cfg["lr_act"], cfg["quant_prob"]) == (1, 2.4, 4e-4, 1.0)


@pytest.mark.parametrize("args, word", [
    (["--method", "minmax", "--iters", "5"], "only apply to the reconstruction methods"),
    (["--method", "detptq-qdrop", "--p", "2"], "--p is not allowed"),
    (["--method", "brecq", "--quant-prob", "0.5"], "method='brecq' quantizes every activation element"),
    (["--method", "joint", "--qdrop-input", "two-coin"], "--qdrop-input is only for --method qdrop | detptq-qdrop"),
    (["--method", "qdrop", "--act-iters", "5"], "--act-iters is only for --method brecq"),
    (["--method", "brecq", "--act-iters", "-1"], "--act-iters -1 must be >= 0"),
    (["--method", "qdrop", "--detptq-use", "loss"], "--detptq-use is only for --method detptq-qdrop"),
    (["--method", "joint", "--rest", "quantized"], "--rest is only for --method detptq | detptq-qdrop"),
    (["--method", "qdrop", "--iters", "0"], "must be > 0"),
    (["--method", "lp", "--loss-norm", "before"], "--loss-norm is only for --method brecq | joint | qdrop | detptq-qdrop"),
    (["--method", "brecq", "--loss-norm", "max"], "invalid choice: 'max'"),
    (["--method", "qdrop", "--state", "no/such/dir/run.state"], "--state 'no/such/dir/run.state': directory"),
    (["--method", "qdrop", "--state", "."], "--state '.' exists and is not a file"),
    (["--method", "qdrop", "--state", "q.pt", "--out", "q.pt"], "--state 'q.pt' is the --out file"),
])
def test_cli_reconstruction_bad_input_is_one_line_and_exit_2(cli, args, word):
    r = cli("quantize", "--w-bits", "4", "--a-bits", "4", "--calib", "4", "--val", "4", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("use", ["scales", "loss"])
def test_detptq_use_puts_the_chosen_p_in_the_scales_or_in_the_loss_only(pretrained, calib, use):
    """Experiment E3's two halves of DetPTQ inside reconstruction: the chosen p's starting scales with the p = 2
    loss ("scales"), or the p = 2 scales with the chosen p's loss ("loss")."""
    opts = dict(iters=1, recon_batch_size=4, max_elements=2**12, lr_act=0.0, quant_prob=1.0, ps=(2.0, 4.5))
    res = run_ptq(pretrained, calib, "detptq-qdrop", 4, 4, detptq_use=use, **opts)
    chosen = res.report["selection"]["chosen"]
    assert set(chosen.values()) == {2.0, 4.5}  # the test needs both p chosen somewhere
    unit_p = {u: h["p"] for u, h in res.report["reconstruction"]["units"].items()}
    assert res.report["config"]["detptq_use"] == use
    if use == "scales":
        assert set(unit_p.values()) == {2.0}
    else:
        assert unit_p == chosen
        lp2 = run_ptq(pretrained, calib, "lp", 4, 4, p=2.0, max_elements=2**12)
        # the step sizes are fixed (lr_act 0): the activation scales are s_2*, not the chosen p's
        for name, layer in quant_layers(res.model).items():
            assert torch.equal(layer.input_quantizer.scale, quant_layers(lp2.model)[name].input_quantizer.scale), name


# ------------------------------------------------------------------ stop and resume
class _Stop(Exception):
    pass


def _stop_after(k):
    """A checkpoint that keeps a copy of every progress record and stops the run after the k-th unit."""
    records = []

    def checkpoint(record):
        records.append(copy.deepcopy(record))
        if len(records) == k:
            raise _Stop
    return checkpoint, records


@pytest.mark.parametrize("cfg, k", [
    (ReconConfig(iters=3, batch_size=4, quant_prob=0.5), 2),  # QDrop: fresh random masks every step
    (ReconConfig(iters=3, batch_size=4, quant_prob=1.0, stages=2, act_iters=2, lr_act=1e-2), 2),  # in pass 1
    (ReconConfig(iters=3, batch_size=4, quant_prob=1.0, stages=2, act_iters=2, lr_act=1e-2), 5),  # in pass 2
])
def test_a_stopped_reconstruction_resumes_to_the_same_result_bit_for_bit(pretrained, minmax_w4a4, calib, cfg, k):
    fp, images = fold_bn(pretrained), calib.images()
    units = ["backbone.c2f1", "backbone.down2", "neck.td3"]
    whole = copy.deepcopy(minmax_w4a4)
    h_whole = reconstruct(whole, fp, images, cfg, unit_p={"neck.td3": 3.0}, units=units)
    q = copy.deepcopy(minmax_w4a4)
    checkpoint, records = _stop_after(k)
    states = []
    with pytest.raises(_Stop):
        reconstruct(q, fp, images, cfg, unit_p={"neck.td3": 3.0}, units=units,
                    checkpoint=lambda r: (states.append(copy.deepcopy(q.state_dict())), checkpoint(r)))
    assert len(records) == k and records[-1]["done"][-1] == (units * 2)[k - 1]
    resumed = copy.deepcopy(minmax_w4a4)
    resumed.load_state_dict(states[-1])  # the model as it was when the record was saved
    h = reconstruct(resumed, fp, images, cfg, unit_p={"neck.td3": 3.0}, units=units, resume=records[-1])
    sw, sr = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(sw[key], sr[key]) for key in sw)
    for u in units:
        a, b = h_whole.units[u], h.units[u]
        assert (a.loss, a.reg, a.act_loss, a.flipped, a.before, a.after) == (b.loss, b.reg, b.act_loss, b.flipped,
                                                                            b.before, b.after)


def test_resume_refuses_the_record_of_another_reconstruction(pretrained, minmax_w4a4, calib):
    fp, images = fold_bn(pretrained), calib.images()
    cfg = ReconConfig(iters=2, batch_size=4)
    checkpoint, records = _stop_after(1)
    with pytest.raises(_Stop):
        reconstruct(copy.deepcopy(minmax_w4a4), fp, images, cfg, units=["neck.down4"], checkpoint=checkpoint)
    q = copy.deepcopy(minmax_w4a4)
    with pytest.raises(ValueError, match="another reconstruction: its config"):
        reconstruct(q, fp, images, ReconConfig(iters=3, batch_size=4), units=["neck.down4"], resume=records[0])
    with pytest.raises(ValueError, match="another reconstruction: its units"):
        reconstruct(q, fp, images, cfg, units=["neck.down3"], resume=records[0])
    with pytest.raises(ValueError, match="resume must be a progress record"):
        reconstruct(q, fp, images, cfg, resume={"done": []})
    with pytest.raises(ValueError, match="resume has stage 'acts'; allowed for this config"):
        reconstruct(q, fp, images, cfg, units=["neck.down4"], resume={**records[0], "stage": "acts"})
    with pytest.raises(ValueError, match="must name units of this reconstruction"):
        reconstruct(q, fp, images, cfg, units=["neck.down4"], resume={**records[0], "done": ["neck.td3"]})
    with pytest.raises(ValueError, match="checkpoint must be None or a callable"):
        reconstruct(q, fp, images, cfg, checkpoint="state.pt")


@pytest.mark.parametrize("method", ["detptq-qdrop"])  # the selection and the reconstruction both come back
def test_run_ptq_with_state_resumes_a_killed_run_to_the_same_model(pretrained, calib, tmp_path, monkeypatch, method):
    import detptq_mini.reconstruction as rec

    opts = dict(iters=2, recon_batch_size=4, max_elements=2**12)
    if method == "detptq-qdrop":
        opts.update(ps=(2.0, 3.0))
    whole = run_ptq(pretrained, calib, method, 4, 4, **opts)
    state = tmp_path / "run.state"
    real, calls = rec.reconstruct_unit, []

    def killed_at_unit_6(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("name"))
        if len(calls) == 6:
            raise KeyboardInterrupt  # what Ctrl-C or a kill between two saves leaves behind
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "reconstruct_unit", killed_at_unit_6)
    with pytest.raises(KeyboardInterrupt):
        run_ptq(pretrained, calib, method, 4, 4, state=state, **opts)
    monkeypatch.setattr(rec, "reconstruct_unit", real)
    assert state.is_file() and [p.name for p in tmp_path.iterdir()] == ["run.state"]  # atomic: no temporary left
    if method == "detptq-qdrop":  # the selection is not run again: it comes from the file
        import detptq_mini.pipeline as pipeline
        monkeypatch.setattr(pipeline, "_detptq", lambda *a, **k: pytest.fail("the selection ran again"))
    res = run_ptq(pretrained, calib, method, 4, 4, state=state, **opts)
    sw, sr = whole.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(sw[key], sr[key]) for key in sw)
    r, w = res.report, whole.report
    assert r["chosen_p"] == w["chosen_p"] and r["reconstruction"]["units"].keys() == w["reconstruction"]["units"].keys()
    assert all(r["reconstruction"]["units"][u]["after"] == w["reconstruction"]["units"][u]["after"]
               for u in w["reconstruction"]["units"])
    assert r["resumed"]["runs"] == 1 and r["resumed"]["seconds_before"] > 0 and r["seconds"] > r["resumed"][
        "seconds_before"] and "resumed" not in w
    with pytest.raises(ValueError, match=r"state=.* is the progress of another run \(its config differs"):
        run_ptq(pretrained, calib, method, 4, 4, state=state, **{**opts, "iters": 3})
    state.write_bytes(b"not a state")
    with pytest.raises(ValueError, match=r"state=.* cannot be read .* delete it to start afresh"):
        run_ptq(pretrained, calib, method, 4, 4, state=state, **opts)
    with pytest.raises(ValueError, match="directory .* does not exist"):
        run_ptq(pretrained, calib, method, 4, 4, state=tmp_path / "no" / "run.state", **opts)
