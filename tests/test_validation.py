"""Every bad-input case of the README's troubleshooting table: one clear error naming the argument.

Library cases raise a ValueError; command-line cases run as subprocesses and must print exactly one line on
stderr (no traceback), exit with status 2 and leave no output file behind.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from detptq_mini.checkpoint import WEIGHTS_DIR, load_checkpoint, load_quantized, save_quantized
from detptq_mini.checks import check_images
from detptq_mini.data import ShapesDataset
from detptq_mini.lp import lp_error, lp_scale_search
from detptq_mini.odol import OdolConfig, odol
from detptq_mini.pipeline import PTQConfig, run_ptq
from detptq_mini.quant import QuantConfig, fake_quantize, quantize_model, set_quant_state

IMG = torch.rand(2, 3, 64, 64)
NAN = torch.tensor([1.0, float("nan")])
INF = torch.tensor([1.0, float("inf")])


@pytest.fixture(scope="module")
def calib8():
    return ShapesDataset("calib", 8, seed=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, pretrained, calib8):
    """A W8A8 and a W4A4 quantized checkpoint, tampered copies of the W8A8 one, and the shipped FP one unversioned."""
    d = tmp_path_factory.mktemp("ckpt")
    fp_config = dict(pretrained.config.__dict__)
    paths = {}
    for w, a in ((8, 8), (4, 4)):
        paths[f"w{w}a{a}"] = d / f"w{w}a{a}.pt"
        save_quantized(run_ptq(pretrained, calib8, "minmax", w, a), paths[f"w{w}a{a}"], fp_config)
    ckpt = torch.load(paths["w8a8"], weights_only=True)
    other_arch = {**ckpt, "config": {**ckpt["config"], "widths": [16, 32, 64, 128, 256]}}
    per_tensor = {**ckpt, "quant": {**ckpt["quant"], "quant_config": {**ckpt["quant"]["quant_config"],
                                                                       "w_per_channel": False}}}
    other_bits = {**ckpt, "quant": {**ckpt["quant"], "quant_config": {**ckpt["quant"]["quant_config"], "w_bits": 4}}}
    bad_bits = {**ckpt, "quant": {**ckpt["quant"], "quant_config": {**ckpt["quant"]["quant_config"], "w_bits": 12}}}
    future_version = {**ckpt, "header": {**ckpt["header"], "format": 99}}
    fp_no_version = {k: v for k, v in torch.load(WEIGHTS_DIR / "detector.pt", weights_only=True).items()
                     if k != "header"}  # an FP checkpoint as written before checkpoints had a format version
    for name, obj in (("other_arch", other_arch), ("per_tensor", per_tensor), ("other_bits", other_bits),
                      ("bad_bits", bad_bits), ("future_version", future_version), ("fp_no_version", fp_no_version)):
        paths[name] = d / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths


# ---------------------------------------------------------------- library
LIBRARY = {
    "bits above 8": (lambda m: PTQConfig(method="lp", w_bits=9), "w_bits=9 must be an integer in 2..8"),
    "bits below 2": (lambda m: QuantConfig(a_bits=1), "a_bits=1 must be an integer in 2..8"),
    "p zero": (lambda m: PTQConfig(method="lp", p=0.0), "p=0.0 must be a finite number > 0"),
    "p nan": (lambda m: PTQConfig(method="lp", p=float("nan")), "p=nan must be a finite number > 0"),
    "p inf": (lambda m: lp_error(torch.ones(3), 1.0, 0, 8, float("inf")), "p=inf must be a finite number > 0"),
    "ps negative": (lambda m: lp_scale_search(torch.ones(3), 4, (-1.0,)), "ps=.* finite numbers > 0"),
    "empty calib": (lambda m: run_ptq(m, torch.zeros(0, 3, 64, 64), "minmax"), "calib is empty"),
    "tiny calib": (lambda m: run_ptq(m, IMG, "minmax", batch_size=4),
                   r"calib has 2 images, fewer than the 4 needed \(batch_size=4\)"),
    "calib wrong shape": (lambda m: run_ptq(m, torch.rand(2, 1, 64, 64), "minmax"),
                          r"calib images must have shape \(N, 3, H, W\), got \(2, 1, 64, 64\)"),
    "calib wrong dtype": (lambda m: run_ptq(m, torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "minmax"),
                          "calib images must be a float tensor .* got dtype torch.uint8"),
    "calib not a tensor": (lambda m: run_ptq(m, [IMG], "minmax"),
                           r"calib must be an \(N, 3, H, W\) float tensor or a data set with .images\(\)"),
    "calib nan": (lambda m: run_ptq(m, torch.full((2, 3, 64, 64), float("nan")), "minmax"),
                  "calib images contain NaN or inf"),
    "images nan (check_images)": (lambda m: check_images(IMG.clone().fill_(float("inf"))), "images .*NaN or inf"),
    "quantizer nan": (lambda m: fake_quantize(NAN, 0.1, 0, 0, 255), "x contains NaN or inf"),
    "search inf": (lambda m: lp_scale_search(INF, 4), "x contains NaN or inf"),
    "unknown method": (lambda m: run_ptq(m, IMG, "magic"), "method='magic' is not a method; allowed: minmax, lp"),
    "unknown option": (lambda m: run_ptq(m, IMG, "minmax", colour="red"), "unknown option.*colour"),
    "unknown odol variant": (lambda m: odol(m(IMG), m(IMG), cls="kl2"), "cls='kl2' is not allowed; allowed: 'kl', 'l2'"),
    "unknown odol variant (OdolConfig)": (lambda m: OdolConfig(cls="kl2"),
                                          "cls='kl2' is not allowed; allowed: 'kl', 'l2'"),
    "unknown odol variant (run_ptq)": (lambda m: PTQConfig(method="detptq", odol_loc="giou"),
                                       "odol_loc='giou' is not allowed; allowed: 'l1', 'iou'"),
    "unknown layer": (lambda m: set_quant_state(quantize_model(m), False, layers=["backbone.nope"]),
                      r"layers has \['backbone.nope'\] that are not quantized layers; allowed: backbone.stem"),
    "unknown protocol": (lambda m: PTQConfig(method="minmax", protocol="qdrop"),
                         "protocol='qdrop' is not allowed; allowed: 'ours', 'head-fp'"),
    "unknown protocol (QuantConfig)": (lambda m: QuantConfig(protocol="head_fp"),
                                       "protocol='head_fp' is not allowed; allowed: 'ours', 'head-fp'"),
    "head-fp without a head": (lambda m: quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)),
                                                        QuantConfig(protocol="head-fp")),
                               r"protocol='head-fp' needs the model's head units, and model is not a UnitDetector "
                               r"\(got Sequential\)"),
}


@pytest.mark.parametrize("case", list(LIBRARY))
def test_library_bad_input(case, pretrained):
    call, message = LIBRARY[case]
    with pytest.raises(ValueError, match=message):
        call(pretrained)


@pytest.mark.parametrize("name, message", [
    ("other_arch", "does not fit this model's architecture"),
    ("per_tensor", "does not fit this model's architecture"),  # scales of another shape
    ("other_bits", "was saved at .* but its quantization config"),
    ("bad_bits", "quantization config this version cannot build: w_bits=12 must be an integer in 2..8"),
    ("future_version", r"has format version 99; this release of detptq-mini reads format version\(s\) 1; re-create it"),
])
def test_checkpoint_for_another_architecture_or_quantization_config(checkpoints, name, message):
    with pytest.raises(ValueError, match=message):
        load_quantized(checkpoints[name])


def test_checkpoint_without_format_version(checkpoints):
    with pytest.raises(ValueError, match=r"fp_no_version.pt' has format version none \(written before checkpoints "
                                         r"had a format version\); this release of detptq-mini reads format "
                                         r"version\(s\) 1; re-create it: `detptq-mini train --out-dir DIR` for an FP"):
        load_checkpoint(checkpoints["fp_no_version"])


def test_output_path_in_missing_directory(tmp_path, pretrained, calib8):
    res = run_ptq(pretrained, calib8, "minmax", 8, 8)
    with pytest.raises(ValueError, match="out=.*directory .* does not exist"):
        save_quantized(res, tmp_path / "missing" / "q.pt", {})
    from detptq_mini.export import export_onnx

    with pytest.raises(ValueError, match="path=.*directory .* does not exist"):
        export_onnx(res.model, tmp_path / "missing" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------- command line
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "detptq_mini.cli", *args], capture_output=True, text=True,
                          timeout=900)


Q = ["quantize", "--w-bits", "8", "--a-bits", "8", "--calib", "4", "--val", "4"]
CLI = {
    "bits": ([*Q[:2], "9", *Q[3:], "--method", "minmax"], "w_bits=9 must be an integer in 2..8"),
    "p zero": ([*Q, "--method", "lp", "--p", "0"], "p=0.0 must be a finite number > 0"),
    "p nan": ([*Q, "--method", "lp", "--p", "nan"], "p=nan must be a finite number > 0"),
    "p inf": ([*Q, "--method", "lp", "--p", "inf"], "p=inf must be a finite number > 0"),
    "p with detptq": ([*Q, "--method", "detptq", "--p", "2"], "--p is not allowed with --method detptq"),
    "empty calib": ([*Q[:5], "--calib", "0", "--method", "minmax"], "argument --calib: 0 must be > 0"),
    "tiny calib": ([*Q, "--method", "minmax", "--batch-size", "8"],
                   "--batch-size 8 is more than the --calib 4 calibration images; allowed: 1..4"),
    "unknown method": ([*Q, "--method", "magic"], "--method 'magic' is not a method; allowed: minmax, lp, detptq"),
    "unknown protocol": ([*Q, "--method", "minmax", "--protocol", "qdrop"],
                         "argument --protocol: invalid choice: 'qdrop' (choose from "),
    "out in missing dir": ([*Q, "--method", "minmax", "--out", "/nonexistent/dir/q.pt"],
                           "--out '/nonexistent/dir/q.pt': directory '/nonexistent/dir' does not exist"),
    "missing checkpoint": (["evaluate", "--checkpoint", "/nonexistent/q.pt"], "does not exist"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_bad_input_one_line_exit_2(cli, case):
    args, message = CLI[case]
    r = cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("detptq-mini: error: ") and message in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("command, name, message", [
    ("evaluate", "other_arch", "does not fit this model's architecture"),
    ("evaluate", "per_tensor", "does not fit this model's architecture"),
    ("evaluate", "other_bits", "was saved at"),
    ("evaluate", "bad_bits", "w_bits=12 must be an integer in 2..8"),
    ("evaluate", "fp_no_version", "has format version none (written before checkpoints had a format version)"),
    ("export", "future_version", "has format version 99; this release of detptq-mini reads format version(s) 1"),
    ("export", "w4a4", "is W4A4; ONNX export needs 8-bit activations"),
    ("export", "fp", "holds an FP model; export needs a W8A8 checkpoint"),
    ("export", "missing_dir", "--onnx"),
    ("export", "not_onnx", "must end in .onnx"),
    ("export", "int4_of_w8a8", "--weights 'int4' needs a model with 4-bit weights (W4A8)"),
])
def test_cli_checkpoint_and_export_cases(cli, checkpoints, tmp_path, command, name, message):
    ckpt = {"fp": WEIGHTS_DIR / "detector.pt"}.get(name, checkpoints.get(name, checkpoints["w8a8"]))
    args = [command, "--checkpoint", str(ckpt), "--val", "4"]
    if command == "export":
        onnx = {"missing_dir": tmp_path / "missing" / "m.onnx", "not_onnx": tmp_path / "m.txt"}.get(name,
                                                                                                  tmp_path / "m.onnx")
        args += ["--onnx", str(onnx)] + (["--weights", "int4"] if name == "int4_of_w8a8" else [])
    r = cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_cli_no_partial_checkpoint_on_bad_input(cli, tmp_path):
    out = tmp_path / "q.pt"
    r = cli(*Q, "--method", "lp", "--p", "-1", "--out", str(out))
    assert r.returncode == 2 and not out.exists() and list(tmp_path.iterdir()) == []


def test_two_identical_quantize_runs_are_identical(tmp_path):
    """Determinism: the same command twice gives the same JSON (all but seconds) and the same saved tensors."""
    runs = []
    for k in range(2):
        out = tmp_path / f"q{k}.pt"
        r = _cli("quantize", "--method", "lp", "--w-bits", "4", "--a-bits", "4", "--calib", "8", "--val", "20",
                 "--json", "--out", str(out))
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res.pop("seconds") > 0
        runs.append((res, torch.load(out, weights_only=True)))
    (a, ca), (b, cb) = runs
    assert a == b
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    assert ca["quant"] == cb["quant"] and ca["report"] == cb["report"]
