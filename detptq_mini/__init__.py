"""detptq-mini: task-loss-guided post-training quantization (DetPTQ) of a small YOLO-style detector.

Modules, in the order data flows: ``data`` -> ``model`` (+ ``adapter``) -> ``train`` / ``evaluate`` -> ``quant`` (+ ``lp``)
-> ``odol`` / ``detptq`` -> ``reconstruction`` -> ``pipeline`` -> ``cli``; ``utils`` and ``checks`` (argument checks)
sit below them all. ``checkpoint`` reads and writes every checkpoint file (FP and quantized) for ``train``, the
``cli`` and :func:`load_pretrained` (public here: the shipped FP detector).
"""

from .checkpoint import load_pretrained
from .utils import seed_everything

__version__ = "0.1.0"
__all__ = ["load_pretrained", "seed_everything", "__version__"]
