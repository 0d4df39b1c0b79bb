"""Time the stages of `scail-win pose` at SCAIL's pose video size and print a table.

    python benchmarks/bench_pose.py [--stages render] [--device cuda] [--frames 32]
                                    [--height 512 --width 896] [--scail-pose-root DIR]

Each stage runs once on a couple of frames to warm up, then on --frames
frames; the table gives frames/s and the peak CUDA memory the stage
allocated (torch's allocator; "-" on CPU).

Stages:
  render  the 3D capsule renderer alone (scail_win.pose.render) and the whole
          pose frame (3D + the 2D face/hands overlay, scail_win.pose.compose)
          on a synthetic person (tests/pose_fixtures.py) seen with SCAIL's
          55-degree camera.  With a SCAIL-Pose checkout (--scail-pose-root,
          default env SCAIL_POSE_ROOT) and taichi installed, SCAIL-Pose's
          Taichi renderer (render_3d/taichi_cylinder.py, on CUDA when
          --device is cuda) renders the same frames: its frames/s, and the
          mean and max absolute pixel difference (RGBA, 0-255) of ours
          against it, plus the share of pixels off by more than 8.
  detect, dwpose, nlf, pipeline
          YOLOX, DWPose and NLF on the driving video's frames, and the whole
          `scail-win pose` job: see benchmarks/pose_model_stages.py (real
          models from --models, or --stand-in test models; each row says which).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from pose_fixtures import dwpose_frame, project, walking_person  # noqa: E402
from scail_win.pose import compose, render, skeleton  # noqa: E402

import pose_model_stages  # noqa: E402  (benchmarks/: the detect, dwpose, nlf and pipeline stages)

MiB = 1 << 20


def fov_intrinsics(height, width, fov_degrees=55.0):
    """SCAIL-Pose's camera for a frame size (NLF's default field of view)."""
    focal = max(height, width) / (math.tan(math.radians(fov_degrees) / 2) * 2)
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])


def measure(fn, device):
    """(seconds, peak MiB or None, result) of one fn() call."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / MiB if cuda else None
    return seconds, peak, result


def synthetic_poses(frames, height, width, intrinsics):
    """NLF joints (T, 1, 24, 3) and DWPose dicts with a face and two hands near the projected joints."""
    joints = walking_person(frames)[:, None]
    poses = []
    for f in range(frames):
        head, right, left = (project(joints[f, 0, j], intrinsics) for j in (15, 21, 20))
        face = head + np.stack([np.linspace(-25, 25, 68), 10 * np.sin(np.arange(68))], axis=1)
        hands = [wrist + np.stack([np.linspace(0, 30, 21), np.linspace(0, 20, 21)], axis=1)
                 for wrist in (right, left)]
        poses.append(dwpose_frame(face, hands, height, width))
    return joints, poses


def load_taichi_renderer(root, device):
    """SCAIL-Pose's render_whole, its Taichi initialised for the benchmark's device."""
    import taichi as ti

    real_init = ti.init
    arch = ti.cuda if device.type == "cuda" else ti.cpu
    ti.init = lambda *a, **kw: real_init(arch=arch)
    if importlib.util.find_spec("imageio") is None:  # imported but unused by render_whole
        sys.modules["imageio"] = types.ModuleType("imageio")
    try:
        spec = importlib.util.spec_from_file_location("scail_pose_taichi_cylinder",
                                                      Path(root) / "render_3d" / "taichi_cylinder.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        ti.init = real_init
    return module.render_whole


def stage_render(args, device):
    height, width, frames = args.height, args.width, args.frames
    intrinsics = fov_intrinsics(height, width)
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    joints, poses = synthetic_poses(frames, height, width, intrinsics)
    specs = [skeleton.cylinder_specs(persons) for persons in joints]

    def ours_3d(n):
        return render.render_cylinders(specs[:n], height, width, fx, fy, cx, cy, device=device, batch=args.batch)

    def ours_frame(n):
        return compose.render_pose_video(joints[:n], poses[:n], intrinsics, height, width, device=device,
                                         batch=args.batch)

    rows = []
    ours_3d(2)
    seconds, peak, ours = measure(lambda: ours_3d(frames), device)
    rows.append(dict(stage="render 3D (ours)", frames=frames, seconds=seconds, peak=peak))
    if importlib.util.find_spec("cv2") is not None:
        ours_frame(2)
        seconds, peak, _ = measure(lambda: ours_frame(frames), device)
        rows.append(dict(stage="render 3D + 2D (ours)", frames=frames, seconds=seconds, peak=peak))
    else:
        rows.append(dict(stage="render 3D + 2D (ours)", note="skipped: OpenCV is not installed"))

    root = args.scail_pose_root
    if root and importlib.util.find_spec("taichi") is not None:
        render_whole = load_taichi_renderer(root, device)

        def theirs(n):
            return np.stack(render_whole(specs[:n], H=height, W=width, fx=fx, fy=fy, cx=cx, cy=cy))

        theirs(2)
        seconds, _, reference = measure(lambda: theirs(frames), torch.device("cpu"))
        diff = np.abs(reference.astype(np.int16) - ours.astype(np.int16))
        rows.append(dict(stage="render 3D (SCAIL-Pose Taichi)", frames=frames, seconds=seconds, peak=None,
                         note=f"ours vs it: mean |diff| {diff.mean():.4f}, max {diff.max()}, "
                              f"{100 * (diff.max(-1) > 8).mean():.4f}% of pixels off by > 8"))
    elif root:
        rows.append(dict(stage="render 3D (SCAIL-Pose Taichi)", note="skipped: taichi is not installed"))
    return rows


STAGES = {"render": stage_render, **pose_model_stages.MODEL_STAGES}


def print_table(title, rows):
    print(title)
    print(f"{'stage':<32}{'frames':>8}{'seconds':>10}{'frames/s':>10}{'peak MiB':>10}  note")
    for row in rows:
        if "seconds" not in row:
            print(f"{row['stage']:<32}{'-':>8}{'-':>10}{'-':>10}{'-':>10}  {row.get('note', '')}")
            continue
        peak = "-" if row["peak"] is None else f"{row['peak']:.0f}"
        print(f"{row['stage']:<32}{row['frames']:>8}{row['seconds']:>10.3f}{row['frames'] / row['seconds']:>10.2f}"
              f"{peak:>10}  {row.get('note', '')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=sorted(STAGES),
                        help="stages to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=896)
    parser.add_argument("--batch", type=int, default=16, help="frames per renderer pass")
    parser.add_argument("--scail-pose-root", default=os.environ.get("SCAIL_POSE_ROOT"),
                        help="SCAIL-Pose checkout whose Taichi renderer to time and compare against")
    pose_model_stages.add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for stage in args.stages:
        rows.extend(STAGES[stage](args, device))
    print_table(f"scail-win pose stages at {args.height}x{args.width} on {name}, torch {torch.__version__}", rows)


if __name__ == "__main__":
    main()
