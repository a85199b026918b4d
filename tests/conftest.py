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
