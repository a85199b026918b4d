"""Small shared helpers: seeding, device parsing, atomic writes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["seed_everything", "resolve_device", "atomic_write_text", "atomic_write_json"]


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (one call at the top of every notebook and script)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``... -> torch.device, with a clear error if unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine; use 'cpu'")
    return dev


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path={str(path)!r}: directory {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj, indent=2)``."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
