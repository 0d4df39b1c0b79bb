"""The pose models' files: where they are looked for, and checks that they are usable.

SCAIL-Pose's layout is kept, so a ``SCAIL-Pose/pretrained_weights`` folder
that already works upstream works here::

    DWPose/yolox_l.onnx              YOLOX-L person detector (yzd-v/DWPose)
    DWPose/dw-ll_ucoco_384.onnx      DWPose-L wholebody, 133 keypoints (yzd-v/DWPose)
    nlf_l_multi_0.3.2.torchscript    NLF-L 3D body model (isarandi/nlf releases)

Nothing is downloaded: a missing or broken file is one error line naming it
and the address to fetch it from.  Neither publisher states a checksum or a
byte size for these files, so the check is what can be known without one:
the file exists, is not empty, and is not a Git LFS pointer or an HTML
error page saved in place of the model (the usual failed download).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scail_win.io.embed_cache import default_cache_dir
from scail_win.errors import UserError

ENV_VAR = "SCAIL_WIN_POSE_MODELS"
# Failed downloads that leave a small text file where the model should be.
_NOT_A_MODEL = (b"version https://git-lfs", b"<!doctype html", b"<html", b"{\"error\"", b"entry not found")


@dataclass(frozen=True)
class ModelFile:
    key: str
    relpath: str  # inside the models folder, as SCAIL-Pose lays it out
    url: str
    what: str


YOLOX = ModelFile("yolox", "DWPose/yolox_l.onnx",
                  "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx", "YOLOX-L person detector")
DWPOSE = ModelFile("dwpose", "DWPose/dw-ll_ucoco_384.onnx",
                   "https://huggingface.co/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx",
                   "DWPose wholebody keypoint model")
NLF = ModelFile("nlf", "nlf_l_multi_0.3.2.torchscript",
                "https://github.com/isarandi/nlf/releases/download/v0.3.2/nlf_l_multi_0.3.2.torchscript",
                "NLF 3D pose model")
MODEL_FILES = (YOLOX, DWPOSE, NLF)


def _scail_checkout() -> Path | None:
    if os.environ.get("SCAIL_ROOT"):
        return Path(os.environ["SCAIL_ROOT"])
    from scail_win.hook import find_scail_root

    return find_scail_root(Path.cwd())


def default_models_dir() -> tuple[Path, str]:
    """The models folder used without ``--models``, and where that choice came from."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override), ENV_VAR
    root = _scail_checkout()
    if root is not None and (root / "SCAIL-Pose" / "pretrained_weights").is_dir():
        return root / "SCAIL-Pose" / "pretrained_weights", "the SCAIL checkout's SCAIL-Pose/pretrained_weights"
    return default_cache_dir() / "pose-models", "scail-win's per-user folder"


def resolve_models_dir(models: str | os.PathLike | None) -> Path:
    """``--models`` if given (it must be a folder), else :func:`default_models_dir`."""
    if models is None:
        return default_models_dir()[0]
    path = Path(models)
    if not path.is_dir():
        raise UserError(f"--models {models}: no such folder; give the folder holding "
                        f"{', '.join(m.relpath for m in MODEL_FILES)}")
    return path


def check_model(models_dir: str | os.PathLike, model: ModelFile) -> Path:
    """The path of ``model`` in ``models_dir``; UserError naming it and its download address if unusable."""
    path = Path(models_dir) / model.relpath
    fetch = f"download {model.url} to {path}"
    if not path.is_file():
        raise UserError(f"{model.what} not found: {path}; {fetch} (or pass --models FOLDER)")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{model.what} {path} is empty; {fetch}")
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip().lower()
    if any(head.startswith(marker) for marker in _NOT_A_MODEL):
        raise UserError(f"{model.what} {path} is a {size}-byte text file (a failed or LFS-pointer "
                        f"download), not the model; {fetch}")
    return path


def check_models(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Every pose model checked, keyed ``yolox``, ``dwpose``, ``nlf``; the first problem is raised."""
    return {model.key: check_model(models_dir, model) for model in MODEL_FILES}
