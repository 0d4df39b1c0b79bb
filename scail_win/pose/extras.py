"""The optional packages of ``scail-win[pose]``, imported with one clear error when missing."""
from __future__ import annotations

import importlib

from scail_win.errors import UserError

_INSTALL = ("pip install scail-win[pose] (for speed, replace onnxruntime with onnxruntime-gpu on "
            "NVIDIA or onnxruntime-directml on other Windows GPUs)")


def require(module: str, package: str):
    """``import module``; UserError naming ``package`` and the extra when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"scail-win pose needs {package} ({exc}); {_INSTALL}") from None


def onnxruntime():
    return require("onnxruntime", "onnxruntime")


def cv2():
    return require("cv2", "opencv-python-headless")
