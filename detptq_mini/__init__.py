"""detptq-mini: task-loss-guided post-training quantization (DetPTQ) of a small YOLO-style detector.

Modules, in the order data flows (each imports only modules before it): ``checks``, ``utils``, ``data``,
``model`` (the restartable-detector base class and the shipped detector), ``adapter``, ``quant``, ``lp``, ``evaluate``,
``odol``, ``detptq``, ``adaround``, ``qdrop``, ``reconstruction``, ``checkpoint``, ``pipeline``; beside them ``train``,
``studies``, ``export``, ``viz``, the ``benchmark`` package and ``cli``. The README's module table says what each
holds; the book's method page states the method. :func:`~detptq_mini.checkpoint.load_pretrained` (a shipped FP
detector: ``"yolo"``, the default, or ``"retinanet-r18"``) is public here.
"""

from .checkpoint import load_pretrained
from .utils import seed_everything

__version__ = "0.1.0"
__all__ = ["load_pretrained", "seed_everything", "__version__"]
