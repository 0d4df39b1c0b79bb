"""Shared test setup: the SCAIL tree on sys.path when given, and marker skips.

``scail`` tests need a SCAIL checkout named by SCAIL_ROOT; ``gpu`` tests a
CUDA device. Without them they are skipped with the reason shown (-rs).
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCAIL_ROOT = os.environ.get("SCAIL_ROOT")
if SCAIL_ROOT and SCAIL_ROOT not in sys.path:
    # After site-packages: PyPI's sat, where installed, stays the default
    # `sat`; on a machine with only the SCAIL tree, the tree's sat is found.
    sys.path.append(SCAIL_ROOT)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    no_tree = pytest.mark.skip(reason="needs a SCAIL checkout: set SCAIL_ROOT")
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    has_gpu = None
    for item in items:
        if "scail" in item.keywords and not SCAIL_ROOT:
            item.add_marker(no_tree)
        if "gpu" in item.keywords:
            if has_gpu is None:
                has_gpu = _cuda_available()
            if not has_gpu:
                item.add_marker(no_gpu)


@pytest.fixture
def rotary_triton_interpreted(monkeypatch):
    """A private copy of the Triton rotary kernels that runs in Triton's CPU interpreter."""
    pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = Path(__file__).resolve().parents[1] / "scail_win" / "model" / "kernels" / "rotary_triton.py"
    spec = importlib.util.spec_from_file_location("_rotary_triton_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
