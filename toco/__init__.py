"""ToCo-style weakly-supervised semantic segmentation.

`from toco import load_segmenter` is the Python API (toco.predict.segmenter); it is imported on
first use, so `import toco` stays cheap for the command-line tools.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_segmenter": "toco.predict.segmenter",
    "Segmenter": "toco.predict.segmenter",
    "Prediction": "toco.predict.segmenter",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toco' has no attribute {name!r}")
