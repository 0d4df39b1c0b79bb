"""The ``scail-win pose`` job: driving video + reference image -> ``rendered.mp4`` beside a copy of the reference.

Stages (each with a progress bar): read and resize-crop the video to the
pose size (512x896, or 896x512 for portrait and square videos, as
process_pose.py swaps it); YOLOX + DWPose per frame; NLF on the person
boxes; with ``--align`` the camera fit to the reference; the PyTorch
renderer; the video written at 16 fps.  Each model is released before the
next stage loads, and the GPU cache is emptied at the end so that sampling
in the same process starts with the memory free.  Nothing existing is
overwritten: an output already there is an error before any work.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from scail_win.io import video as video_io
from scail_win.errors import UserError
from scail_win.pose import align, detect, extras, models, nlf

log = logging.getLogger(__name__)

DEFAULT_RESOLUTION = (512, 896)  # (H, W) for landscape; swapped for portrait, as upstream
OUTPUT_FPS = 16
# moviepy (what SCAIL-Pose writes with) leaves libx264 at its default quality.
OUTPUT_CRF = 23
_REF_SUFFIX = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}


@dataclass
class PoseJob:
    driving: Path
    ref: Path
    out_dir: Path
    models_dir: Path | None = None
    align: bool = False
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    pose_device: str = "auto"
    nlf_batch: int = 16
    progress: bool = True


@dataclass
class PoseResult:
    video: Path
    ref: Path
    frames: int
    size: tuple[int, int]                       # (H, W)
    seconds: dict = field(default_factory=dict)  # per stage


def torch_device(pose_device: str) -> torch.device:
    """Where NLF and the renderer run: CUDA for auto/cuda when torch has it, else the CPU."""
    if pose_device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if pose_device == "cuda":
        raise UserError("--pose-device cuda: this torch has no CUDA device; use --pose-device auto or cpu")
    if pose_device == "directml":
        log.info("NLF and the renderer run on the CPU (torch has no DirectML backend here)")
    return torch.device("cpu")


def pose_size(height: int, width: int, resolution: Sequence[int]) -> tuple[int, int]:
    """process_pose.py's target (H, W): ``resolution`` for landscape frames, swapped otherwise."""
    res_h, res_w = (int(v) for v in resolution)
    return (res_h, res_w) if height < width else (res_w, res_h)


def output_paths(job: PoseJob) -> tuple[Path, Path]:
    """Where the video and the reference copy go; UserError if either is taken."""
    if job.out_dir.exists() and not job.out_dir.is_dir():
        raise UserError(f"--out {job.out_dir} is a file; give a folder")
    video = job.out_dir / ("rendered_aligned.mp4" if job.align else "rendered.mp4")
    if os.path.lexists(video):
        raise UserError(f"{video} already exists; choose another --out (nothing was overwritten)")
    suffix = _REF_SUFFIX.get(job.ref.suffix.lower(), ".png")
    ref = job.out_dir / f"ref{suffix}"
    for existing in (job.out_dir / "ref.jpg", job.out_dir / "ref.png"):
        if os.path.lexists(existing) and not (existing == ref and _same_file(existing, job.ref)):
            raise UserError(f"{existing} already exists; choose another --out (nothing was overwritten)")
    return video, ref


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def copy_reference(src: Path, dest: Path) -> None:
    """The reference as ``ref.jpg``/``ref.png`` (other formats re-saved as PNG), never over another file."""
    if _same_file(src, dest):
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() in _REF_SUFFIX:
        with open(src, "rb") as inp, open(dest, "xb") as out:
            shutil.copyfileobj(inp, out)
        return
    with Image.open(src) as img, open(dest, "xb") as out:
        img.convert("RGB").save(out, format="PNG")


def read_reference(path: Path) -> np.ndarray:
    """The reference image as H x W x 3 uint8 RGB."""
    video_io.probe_image(path)  # one UserError line for missing/unreadable files
    with Image.open(path) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


def read_frames(path: Path, resolution: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Every frame, resize-cropped to the pose size: uint8 T x H x W x 3, and that (H, W)."""
    info = video_io.probe_video(path)
    size = pose_size(info.height, info.width, resolution)
    frames, _ = video_io.read_video(path)
    crop = video_io.resize_for_rectangle_crop(frames.permute(0, 3, 1, 2), size)
    return crop.permute(0, 2, 3, 1).contiguous(), size


def detect_all(detector, frames: torch.Tensor, progress: bool = True, desc: str = "YOLOX + DWPose") -> list:
    """The detector on every frame, in order."""
    return [detector(frame.numpy()) for frame in tqdm(frames, desc=desc, unit="frame", disable=not progress)]


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_pose(job: PoseJob) -> PoseResult:
    """Run the whole job; returns where it wrote and how long each stage took.

    Whatever happens, the models are released and the GPU cache emptied
    before it returns.
    """
    try:
        return _run(job)
    finally:
        _release(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def _run(job: PoseJob) -> PoseResult:
    from scail_win.pose.compose import render_pose_video
    from scail_win.pose.skeleton import smpl_to_coco18

    extras.onnxruntime()
    extras.cv2()
    video_path, ref_path = output_paths(job)
    models_dir = models.resolve_models_dir(job.models_dir)
    files = models.check_models(models_dir)
    providers = detect.choose_providers(job.pose_device)
    device = torch_device(job.pose_device)
    ref_rgb = read_reference(job.ref)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    frames, (height, width) = read_frames(job.driving, job.resolution)
    seconds["read"] = time.perf_counter() - start
    log.info("%d frames of %s at %dx%d", frames.shape[0], job.driving, width, height)

    start = time.perf_counter()
    detector = detect.WholebodyDetector(files["yolox"], files["dwpose"], providers)
    found = detect_all(detector, frames, job.progress)
    ref_found = None
    if job.align:
        ref_frame = video_io.resize_for_rectangle_crop(torch.from_numpy(ref_rgb).permute(2, 0, 1), (height, width))
        ref_found = detector(ref_frame.permute(1, 2, 0).contiguous().numpy())
    del detector
    _release(device)
    seconds["detect"] = time.perf_counter() - start
    boxes = [d.boxes for d in found]
    if not any(boxes):
        raise UserError(f"no person found in {job.driving} (YOLOX saw nobody in any of its {len(boxes)} frames)")
    if job.align and not ref_found.boxes:
        raise UserError(f"--align: no person found in the reference image {job.ref}; run without --align")

    start = time.perf_counter()
    model = nlf.load_nlf(files["nlf"], device)
    try:
        joints = nlf.run_nlf(model, frames, boxes, device, batch_size=job.nlf_batch, progress=job.progress)
    finally:
        del model
        _release(device)
    seconds["nlf"] = time.perf_counter() - start
    people = nlf.first_person(joints)

    poses = [d.pose for d in found]
    camera = align.intrinsics_from_fov(height, width)
    if job.align:
        if not joints[0] or not len(joints[0][0]):
            raise UserError(f"--align: no person found in the first frame of {job.driving}; run without --align")
        new_camera, m, s = align.fit_camera(smpl_to_coco18(joints[0][0][0]), ref_found.pose, camera[0, 0],
                                            height, width)
        face = align.scale_faces(poses, ref_found.pose)
        log.info("--align: camera scale %.3f, aspect %.3f, face scale %.3f", m, s, face)
        poses = align.first_person_poses(poses)
        align.shift_to_camera(people, poses, camera, new_camera, height, width, scale_x=m, scale_y=m * s)
        camera = new_camera

    start = time.perf_counter()
    try:
        video = render_pose_video(people, poses, camera, height, width, device=device, progress=job.progress)
    finally:
        _release(device)
    seconds["render"] = time.perf_counter() - start

    written = video_io.write_video(video, video_path, OUTPUT_FPS, crf=OUTPUT_CRF)
    copy_reference(job.ref, ref_path)
    log.info("wrote %s and %s", written, ref_path)
    return PoseResult(written, ref_path, int(video.shape[0]), (height, width), seconds)
