from typing import NamedTuple

import pytest
import torch

from detptq_mini import load_pretrained
from detptq_mini.checkpoint import WEIGHTS_DIR
from detptq_mini.data import ShapesDataset


@pytest.fixture(scope="session")
def val_small():
    return ShapesDataset("val", 64, seed=0)


@pytest.fixture(scope="session")
def pretrained():
    if not (WEIGHTS_DIR / "detector.pt").exists():
        pytest.fail("shipped weights are missing: run `make weights`")
    return load_pretrained()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """``cli(*args) -> CliResult``: ``detptq-mini *args`` run in this process by ``detptq_mini.cli.main``, its exit
    status and what it printed. For the bad-input cases, which end before any work: a subprocess would spend
    most of its few seconds starting Python and importing torch (tests/test_cli.py keeps one real process)."""
    from detptq_mini.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()  # drop what the test printed before
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
