"""SCAIL-Pose's own functions, loaded from a checkout named by SCAIL_POSE_ROOT, for parity tests.

Only the pieces that run without its GPU-only environment are loaded: the
DWPose package (its controlnet_aux import stubbed: HWC3 of an RGB
uint8 image is the image; its drawing module left out) and align3d.py (its unused sympy import stubbed).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest


def root() -> Path:
    value = os.environ.get("SCAIL_POSE_ROOT")
    if not value:
        pytest.skip("needs a SCAIL-Pose checkout: set SCAIL_POSE_ROOT")
    return Path(value)


def _load(name: str, path: Path, package_dir: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dwpose(monkeypatch):
    """SCAIL-Pose's DWPoseProcess/dwpose package (DWposeDetector, onnxdet, onnxpose, wholebody)."""
    pytest.importorskip("cv2", reason="SCAIL-Pose's DWPose code needs opencv")
    folder = root() / "DWPoseProcess" / "dwpose"
    util = types.ModuleType("controlnet_aux.util")
    util.HWC3 = lambda image: image
    util.resize_image = None
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    monkeypatch.setitem(sys.modules, "controlnet_aux.util", util)
    for name in list(sys.modules):
        if name.startswith("upstream_dwpose"):
            monkeypatch.delitem(sys.modules, name)
    # Its drawing helpers (matplotlib) are not what is compared.
    monkeypatch.setitem(sys.modules, "upstream_dwpose.util", types.ModuleType("upstream_dwpose.util"))
    return _load("upstream_dwpose", folder / "__init__.py", folder)


def align3d(monkeypatch):
    pytest.importorskip("scipy", reason="SCAIL-Pose's align3d.py needs scipy")
    sympy = types.ModuleType("sympy")
    sympy.beta = None
    monkeypatch.setitem(sys.modules, "sympy", sympy)
    return _load("upstream_align3d", root() / "NLFPoseExtract" / "align3d.py")


def functions(monkeypatch, relpath: str, names: tuple[str, ...]) -> dict:
    """Top-level functions of a SCAIL-Pose file, compiled alone (its imports need the GPU environment)."""
    import ast

    import numpy as np
    import torch

    path = root() / relpath
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise LookupError(f"{path} has no {sorted(missing)}")
    namespace = {"np": np, "torch": torch, "copy": __import__("copy")}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in names}
