import json
import subprocess
import sys

import pytest

from detptq_mini.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "detptq_mini.cli", *args], capture_output=True, text=True, timeout=600)


def test_evaluate_json_for_the_shipped_model(pretrained):
    r = _run("evaluate", "--json", "--val", "100")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"map", "map50"} <= set(out)
    assert 0.8 < out["map"] <= 1.0 and 0.95 < out["map50"] <= 1.0


@pytest.mark.parametrize("args, word", [
    (["evaluate", "--checkpoint", "/nonexistent/q.pt"], "does not exist"),
    (["evaluate", "--val", "0"], "must be > 0"),
    (["evaluate", "--device", "tpu9"], "device"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, word):
    r = _run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in r.stderr


def test_checkpoint_for_another_architecture(tmp_path, capsys):
    import torch

    from detptq_mini.checkpoint import checkpoint_header
    from detptq_mini.model import Detector, DetectorConfig

    other = Detector(DetectorConfig(widths=(16, 32, 64, 128, 256)))
    path = tmp_path / "other.pt"
    torch.save({"header": checkpoint_header("fp"), "state_dict": other.state_dict(), "config": {}},
               path)  # default config, wrong weights
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    assert "does not fit this model's architecture" in capsys.readouterr().err


def test_quantize_protocol_reaches_the_report(tmp_path, capsys):
    from torch import nn

    from detptq_mini.checkpoint import load_quantized
    from detptq_mini.cli import build_parser

    base = ["quantize", "--method", "minmax", "--w-bits", "4", "--a-bits", "4", "--calib", "2", "--val", "4"]
    assert build_parser().parse_args(base).protocol == "ours"  # the default
    out = tmp_path / "q.pt"
    assert main([*base, "--protocol", "head-fp", "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config"]["protocol"] == "head-fp" and res["quant_config"]["protocol"] == "head-fp"
    qmodel, report = load_quantized(out)
    assert report["config"]["protocol"] == "head-fp"
    assert type(qmodel.get_submodule("head.p3.cls.pred")) is nn.Conv2d
    assert main([*base, "--protocol", "head_fp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --protocol: invalid choice: 'head_fp'" in err[0]
