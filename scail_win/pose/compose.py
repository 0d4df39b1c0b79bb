"""SCAIL's pose video from NLF joints and DWPose keypoints (render_nlf_as_images, no augmentation).

The 3D capsules are rendered with the given intrinsics, then every channel
where the 2D overlay (cheeks, hands, face) is non-zero takes the overlay's
value -- per channel, as SCAIL-Pose's ``frame[mask] = canvas[mask]`` does, so
a blue hand dot over a limb keeps the limb's red and green -- and the alpha
channel is dropped (the video writer keeps RGB).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from scail_win.pose.draw2d import draw_frame
from scail_win.pose.render import render_cylinders
from scail_win.pose.skeleton import cylinder_specs


def render_pose_video(smpl_joints_per_frame: Sequence, dwposes_per_frame: Sequence[dict] | None,
                      intrinsics, height: int, width: int, device=None, batch: int = 16,
                      radius: float = 21.5, progress: bool = False) -> np.ndarray:
    """(T, height, width, 3) uint8 RGB pose frames.

    smpl_joints_per_frame: per frame, the persons' (24, 3) NLF joints (an
    all-zero array for a person NLF missed), e.g. a (T, persons, 24, 3)
    array.  dwposes_per_frame: per frame, DWposeDetector's dict, or None for
    no 2D layer.  intrinsics: the 3x3 camera matrix the joints are seen with.
    radius: the limbs' radius in the joints' unit (SCAIL-Pose: 21.5 mm).
    """
    intrinsics = np.asarray(intrinsics, np.float64)
    if intrinsics.shape != (3, 3):
        raise ValueError(f"intrinsics must be a 3x3 matrix, got shape {intrinsics.shape}")
    if dwposes_per_frame is not None and len(dwposes_per_frame) != len(smpl_joints_per_frame):
        raise ValueError(f"{len(smpl_joints_per_frame)} frames of joints but {len(dwposes_per_frame)} of DWPose")
    specs = [cylinder_specs(persons) for persons in smpl_joints_per_frame]
    frames = render_cylinders(specs, height, width, fx=intrinsics[0, 0], fy=intrinsics[1, 1],
                              cx=intrinsics[0, 2], cy=intrinsics[1, 2], radius=radius, device=device,
                              batch=batch, progress=progress)
    rgb = np.ascontiguousarray(frames[..., :3])
    if dwposes_per_frame is not None:
        from tqdm import tqdm

        for t, pose in enumerate(tqdm(dwposes_per_frame, desc="draw 2D", unit="frame", disable=not progress)):
            overlay = draw_frame(pose, height, width)
            mask = overlay != 0
            rgb[t][mask] = overlay[mask]
    return rgb
