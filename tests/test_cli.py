import json
import subprocess
import sys

import pytest
import torch

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
def test_bad_input_is_one_line_and_exit_2(cli, args, word):
    r = _run(*args) if args == ["frobnicate"] else cli(*args)  # one real process: its exit status and stderr
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


# --- --model retinanet-r18 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, word", [
    (["train", "--resume"], "--resume is only for --model retinanet-r18, not yolo"),
    (["train", "--check-anchors"], "--check-anchors is only for --model retinanet-r18"),
    (["train", "--model", "r50"], "argument --model: invalid choice: 'r50'"),
    (["evaluate", "--model", "r50"], "argument --model: invalid choice: 'r50'"),
    (["export", "--model", "retinanet-r18", "--checkpoint", "q.pt", "--onnx", "m.onnx"],
     "--model retinanet-r18: export writes the YOLO-style detector's int8 ONNX graph only; allowed: yolo"),
    (["quantize", "--model", "retinanet-r18", "--method", "minmax", "--w-bits", "8", "--a-bits", "8", "--deploy"],
     "--deploy is only for --model yolo"),
    (["train", "--model", "retinanet-r18", "--train-size", "4", "--batch-size", "8"],
     "--batch-size 8 is more than the 4 training images; allowed: 1..4"),
])
def test_model_flags_bad_input_is_one_line_and_exit_2(args, word, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err


def test_check_anchors_reports_the_recall_of_the_default_and_our_anchors(capsys):
    assert main(["train", "--model", "retinanet-r18", "--check-anchors", "--train-size", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "retinanet-r18" and out["train_images"] == 50
    assert out["default"]["anchor_sizes"][0] == [32.0, 40.0, 50.0] and out["ours"]["anchor_sizes"][0][0] == 12.0
    assert out["ours"]["recall_iou50"] > out["default"]["recall_iou50"]
    assert out["ours"]["recall_iou50"] <= out["ours"]["recall_iou40"]


def test_retinanet_train_resume_evaluate_and_quantize_from_the_command_line(tmp_path, monkeypatch, capsys):
    """One tiny real run through the command line: train (1 epoch), resume to 2 epochs, then the shipped weights
    (here: tmp_path) evaluate and quantize with --model retinanet-r18, and the yolo commands refuse them."""
    from detptq_mini import checkpoint

    out, state = tmp_path / "weights", tmp_path / "state"
    out.mkdir()
    base = ["train", "--model", "retinanet-r18", "--train-size", "8", "--batch-size", "4", "--val", "4",
            "--out-dir", str(out), "--state-dir", str(state), "--threads", "1", "--json"]
    assert main([*base, "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["model"] == "retinanet-r18" and first["threads"] == 1 and first["steps"] == 2
    assert main([*base, "--epochs", "1", "--resume"]) == 0  # the state after its last epoch: nothing left to do
    again = json.loads(capsys.readouterr().out)
    saved = torch.load(next(state.glob("*.pt")), weights_only=False)["seconds"]  # training time, before the eval
    # the resumed run counts the saved training time and adds its own (its eval): not the first run's eval time
    assert again["map"] == first["map"] and saved < first["seconds"] and again["seconds"] > saved
    assert main([*base, "--epochs", "2", "--resume"]) == 2  # another schedule: not the same run
    assert "another run" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", out)
    assert main(["evaluate", "--model", "retinanet-r18", "--val", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["model"] == "retinanet-r18" and 0 <= ev["map"] <= 1
    assert main(["evaluate", "--checkpoint", str(out / "retinanet-r18.pt")]) == 2
    err = capsys.readouterr().err
    assert "holds model 'retinanet-r18', not 'yolo'" in err and "--model retinanet-r18" in err
    q = tmp_path / "q.pt"
    assert main(["quantize", "--model", "retinanet-r18", "--method", "minmax", "--w-bits", "8", "--a-bits", "8",
                 "--calib", "2", "--val", "4", "--json", "--out", str(q)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "retinanet-r18" and res["fp_map"] == first["map"]
    assert checkpoint.read_checkpoint(q)["header"]["model"] == "retinanet-r18"
    assert main(["evaluate", "--model", "retinanet-r18", "--checkpoint", str(q), "--val", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["map"] == res["map"]
    assert main(["export", "--checkpoint", str(q), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "holds model 'retinanet-r18', not 'yolo'" in capsys.readouterr().err


def test_a_closed_pipe_ends_a_listing_quietly():
    """`detptq-mini benchmark --list | head -1`: when the reader has closed the pipe before the listing is written
    (here at once, while the command still imports torch), the command exits 0 without a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "detptq_mini.cli", "benchmark", "--suite", "full", "--list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
