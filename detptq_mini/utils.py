"""Small shared helpers: seeding, device parsing, atomic writes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .checks import shown

__all__ = ["seed_everything", "resolve_device", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]


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


def _temporary_beside(path: str | os.PathLike, argument: str) -> tuple[Path, Path]:
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{shown(argument, str(path))}: directory {str(path.parent)!r} does not exist")
    return path, path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str, argument: str = "path") -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    path, tmp = _temporary_beside(path, argument)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str | os.PathLike, argument: str = "path") -> None:
    """``torch.save`` through a temporary file and a rename (``argument`` names the path in errors)."""
    path, tmp = _temporary_beside(path, argument)
    try:
        torch.save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj, indent=2)``."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
